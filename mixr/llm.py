"""`LLM`: the offline API, in the style of vLLM's, on top of the engine."""

import itertools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from mixr.engine.llm_engine import EngineConfig, LLMEngine, RequestOutput
from mixr.models.base import CausalLM
from mixr.sampling import SamplingParams
from mixr.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """A model directory loaded for generation, or an in-memory CausalLM with its tokenizer.

    >>> llm = LLM("path/to/hf-model")
    >>> llm.generate(["1+1="], SamplingParams(temperature=0, max_tokens=8))[0].text
    >>> llm = LLM(policy, tokenizer=tok, dtype="bfloat16")   # a copy in bf16; policy itself if dtype matches
    >>> llm.update_weights(policy.state_dict())              # after each optimizer step: in place, no disk
    >>> llm = LLM("path/to/hf-model", quantization="int4")   # int8 / int4 weights on load; "fp8": FP8 checkpoints
    >>> llm = LLM("path/to/base", adapter="path/to/lora")    # a peft-format LoRA adapter, merged on load

    Extra keyword arguments are EngineConfig fields (block_size, max_num_seqs, max_model_len,
    gpu_memory_utilization, kv_cache_bytes, enable_prefix_caching, cuda_graphs, quantization, ...), e.g.
    moe_dynamic="top_p", moe_top_p=0.9 (a per-token number of routed experts) or expert_offload="cpu",
    gpu_expert_budget_gb=4 (routed experts beyond the budget in CPU memory), or tensor_parallel_size=N,
    parallel_experts="ep", parallel_attention="dp" (N processes, one per GPU, mixr.engine.distributed; close() or
    `with LLM(...) as llm:` stops them, as do garbage collection and interpreter exit).
    """

    def __init__(self, model: str | Path | CausalLM, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, tokenizer: Tokenizer | None = None, **engine_config):
        self.engine = LLMEngine(model, device=device, dtype=dtype, config=EngineConfig(**engine_config),
                                tokenizer=tokenizer)
        self.model, self.tokenizer, self.device = self.engine.model, self.engine.tokenizer, self.engine.device
        self.config = self.model.config
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (a tensor-parallel LLM cannot generate after)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy new weights into the engine's model in place and reset the prefix cache (LLMEngine.update_weights)."""
        return self.engine.update_weights(weights)

    def _add(self, prompts, params, stream: bool) -> list[str]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                rid = f"offline-{next(self._ids)}"
                try:
                    self.engine.add_request(rid, p, sp, stream=stream)
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}") from None
                ids.append(rid)
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); one RequestOutput per prompt, in order."""
        ids = self._add(prompts, params, stream=False)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as they are decoded."""
        (rid,) = self._add([prompt], params, stream=True)
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == rid:
                        if out.outputs[0].delta_text:
                            yield out.outputs[0].delta_text
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)  # the consumer stopped early: free the blocks

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None,
             add_generation_prompt: bool = True, **template_kwargs) -> list[RequestOutput]:
        """Apply the chat template to one conversation or a list of them and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                      tokenize=True, **template_kwargs) for c in convs]
        return self.generate(prompts, params)
