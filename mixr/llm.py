"""`LLM`: load a model directory and generate, in the style of vLLM's offline API.

This is the reference generation path: one batch, a contiguous cache, prefill then token-by-token decode.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixr.checkpoint import load_model
from mixr.kv_cache import ContiguousCache
from mixr.sampling import SamplingParams, make_generator, sample
from mixr.tokenizer import Tokenizer

Prompt = str | list[int]


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos, stop token or stop string) or "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Request:
    """Decoding state of one row: tokens, detokenised text, and what may already be shown to a stream."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, stop_ids: set[int],
                 device: torch.device):
        self.out = RequestOutput(prompt_token_ids=prompt_ids)
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else stop_ids)
        self.decoder = tokenizer.decode_stream(skip_special_tokens=params.skip_special_tokens)
        self.generator = make_generator(params, device)
        # Text that could still turn out to begin a stop string is held back from streams.
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.emitted = 0

    def append(self, token: int) -> str:
        """Add one sampled token; return the newly visible text."""
        out, p = self.out, self.params
        out.token_ids.append(token)
        delta = self.decoder.step(token)
        if token in self.stop_ids:
            out.finish_reason = "stop"
        else:
            out.text += delta
            if p.stop:
                window = len(delta) + self.holdback
                hits = [i for s in p.stop if (i := out.text.find(s, max(0, len(out.text) - window - 1))) >= 0]
                if hits:
                    out.text = out.text[:min(hits)]
                    out.finish_reason = "stop"
        if out.finish_reason is None and len(out.token_ids) >= p.max_tokens:
            out.finish_reason = "length"
        visible = len(out.text) if out.finished else max(self.emitted, len(out.text) - self.holdback)
        new, self.emitted = out.text[self.emitted:visible], visible
        return new


class LLM:
    """A model directory loaded for generation.

    >>> llm = LLM("path/to/hf-model")
    >>> llm.generate(["1+1="], SamplingParams(temperature=0, max_tokens=8))[0].text
    """

    def __init__(self, model: str | Path, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_model_len: int | None = None):
        self.device = torch.device(device or default_device())
        self.model = load_model(model, device=self.device, dtype=dtype).eval()
        self.config = self.model.config
        self.tokenizer = Tokenizer.from_dir(model)
        self.max_model_len = max_model_len or self.config.max_position_embeddings

    # -- prompts -----------------------------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.config.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        return ids

    def _batch(self, prompts, params) -> tuple[list[list[int]], list[SamplingParams]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self._encode(p) for p in prompts]
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} SamplingParams for {len(ids)} prompts")
        for i, (p, sp) in enumerate(zip(ids, params)):
            if len(p) + sp.max_tokens > self.max_model_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_tokens={sp.max_tokens} it exceeds the "
                                 f"model's context of {self.max_model_len} tokens")
        return ids, params

    # -- generation --------------------------------------------------------------------------------------------
    def _requests(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[_Request]:
        stop_ids = self.tokenizer.stop_token_ids
        return [_Request(p, sp, self.tokenizer, stop_ids, self.device) for p, sp in zip(prompt_ids, params)]

    @torch.inference_mode()
    def _run(self, reqs: list[_Request]) -> Iterator[list[tuple[int, str]]]:
        """Decode the requests together; after each step yield (request index, newly visible text) for every
        request that was still running."""
        dev, model = self.device, self.model
        prompt_ids = [r.out.prompt_token_ids for r in reqs]
        B = len(reqs)
        lens = [len(p) for p in prompt_ids]
        total = max(n + r.params.max_tokens for n, r in zip(lens, reqs))
        cache = ContiguousCache(len(model.model.layers), B, total, self.config.cache_shapes(),
                                model.lm_head.weight.dtype, dev)
        L = max(lens)
        ids = torch.zeros(B, L, dtype=torch.long, device=dev)
        for i, p in enumerate(prompt_ids):  # right padding: row i's slots >= lens[i] hold throwaway entries
            ids[i, :len(p)] = torch.tensor(p, device=dev)
        positions = torch.arange(L, device=dev).expand(B, L)
        cache.length = L
        hidden = model.hidden_states(ids, positions, cache)
        rows = torch.arange(B, device=dev)
        last = torch.tensor(lens, device=dev) - 1
        logits = model.lm_head(hidden[rows, last])  # (B, vocab)
        pos = list(lens)
        while True:
            step = []
            for i, r in enumerate(reqs):
                if not r.out.finished:
                    step.append((i, r.append(sample(logits[i], r.params, r.generator))))
            yield step
            if all(r.out.finished for r in reqs):
                return
            tokens = torch.tensor([[r.out.token_ids[-1]] for r in reqs], device=dev)
            cur = torch.tensor([[p] for p in pos], device=dev)
            for i, r in enumerate(reqs):
                if not r.out.finished:
                    pos[i] += 1
            cache.length = max(pos)
            logits = model.lm_head(model.hidden_states(tokens, cur, cache)[:, -1])

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); one RequestOutput per prompt, in order."""
        reqs = self._requests(*self._batch(prompts, params))
        for _ in self._run(reqs):
            pass
        return [r.out for r in reqs]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as they are decoded."""
        for step in self._run(self._requests(*self._batch([prompt], params))):
            for _, text in step:
                if text:
                    yield text

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             add_generation_prompt: bool = True, **template_kwargs) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                      tokenize=True, **template_kwargs) for c in convs]
        return self.generate(prompts, params)
