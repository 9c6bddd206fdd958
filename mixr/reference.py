"""The reference generation path: one static right-padded batch, a contiguous cache, greedy decoding.

Slow and simple on purpose: the engine's output (paged, continuously batched, prefix-cached, preempted) is
tested token for token against it.
"""

import torch

from mixr.kv_cache import ContiguousCache
from mixr.models.base import CausalLM


@torch.inference_mode()
def reference_generate(model: CausalLM, prompts: list[list[int]], max_tokens: int,
                       absorbed_decode: bool = False) -> list[list[int]]:
    """Greedy continuation of each prompt by max_tokens tokens (no eos stop).

    absorbed_decode: run decode steps through MLA's absorbed path instead of the expanded one.
    """
    dev = model.lm_head.weight.device
    B, lens = len(prompts), [len(p) for p in prompts]
    L = max(lens)
    cache = ContiguousCache(len(model.model.layers), B, L + max_tokens, model.config.cache_shapes(),
                            model.lm_head.weight.dtype, dev)
    ids = torch.zeros(B, L, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    cache.length = L
    hidden = model.hidden_states(ids, torch.arange(L, device=dev).expand(B, L), cache)
    logits = model.lm_head(hidden[torch.arange(B), torch.tensor(lens) - 1])
    out = [[] for _ in prompts]
    pos = torch.tensor(lens, device=dev)[:, None]
    cache.decode = absorbed_decode
    for step in range(max_tokens):
        tokens = logits.argmax(-1)
        for i, t in enumerate(tokens.tolist()):
            out[i].append(t)
        if step == max_tokens - 1:
            break
        cache.length = L + step + 1
        logits = model.lm_head(model.hidden_states(tokens[:, None], pos + step, cache)[:, -1])
    return out
