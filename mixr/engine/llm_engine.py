"""LLMEngine: requests in, incremental outputs out. step() = schedule, run the model, sample, postprocess."""

import copy
import itertools
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixr.checkpoint import LOAD_FORMATS, load_model, resolve_dtype
from mixr.engine.distributed import DataParallelRunner, ParallelRunner, Workers
from mixr.engine.model_runner import ModelRunner
from mixr.engine.scheduler import Scheduler, SchedulerConfig
from mixr.engine.sequence import Sequence
from mixr.layers.moe import check_dynamic, set_dynamic_experts
from mixr.models.base import CausalLM
from mixr.offload import load_offloaded
from mixr.sampling import PendingSample, SampleRequest, SamplingParams, make_rng
from mixr.tokenizer import Tokenizer


@dataclass(slots=True)
class EngineConfig:
    """Engine settings. KV memory: gpu_memory_utilization of the GPU (after weights and activations), or
    kv_cache_bytes when given (the CPU default is 2 GiB)."""

    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    gpu_memory_utilization: float = 0.9
    kv_cache_bytes: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    cuda_graphs: bool = True
    # weight quantization on load (mixr.checkpoint.load_model): "int8", "int4" (round-to-nearest from a
    # full-precision checkpoint) or "fp8" (keep an FP8 checkpoint's weights in FP8); None: as stored
    quantization: str | None = None
    # dynamic expert count per token (mixr.layers.moe): "top_p" or "entropy" over each token's moe_k_max
    # candidates (default: the model's top_k), at least moe_k_min; None: exact top-k
    moe_dynamic: str | None = None
    moe_top_p: float = 1.0
    moe_entropy_scale: float = 1.0
    moe_k_min: int = 1
    moe_k_max: int | None = None
    # CPU+GPU hybrid experts (mixr.offload): "cpu" keeps routed experts in pinned CPU memory with a device cache
    # of gpu_expert_budget_gb (1e9 bytes); decoding then runs eagerly (no CUDA graphs)
    expert_offload: str | None = None
    gpu_expert_budget_gb: float = 0.0
    # a LoRA adapter directory (peft's format, mixr.train.lora), merged into the weights on load
    adapter: str | None = None
    # KV cache storage: "auto" (the model dtype) or "fp8" (float8_e4m3fn, per-tensor scale 1.0: mixr.kv_cache),
    # which holds twice the tokens of a bf16 cache in the same memory
    kv_cache_dtype: str = "auto"
    # tensor parallelism (mixr.engine.distributed): this process and tensor_parallel_size - 1 workers, rank r on
    # cuda:r, each with its shard; routed experts split by "tp" (each expert's intermediate dim) or "ep" (whole
    # experts per rank)
    tensor_parallel_size: int = 1
    parallel_experts: str = "tp"
    # "dp": data-parallel attention (SGLang's --enable-dp-attention) over the tensor_parallel_size ranks: each runs
    # the whole attention for sequences of its own, with a KV cache of its own, and the routed experts are split
    # by expert (parallel_experts="ep"), tokens sent to their experts' ranks and back (mixr.parallel)
    parallel_attention: str = "tp"
    # on GPUs, all-reduces of up to 1 MiB (decode steps) as one symmetric-memory kernel (mixr.parallel.Comm) instead
    # of NCCL. Opt-in: it has not yet run on a multi-GPU host (tests/test_tp_engine.py has its GPU tests)
    custom_all_reduce: bool = False
    # queue each decode step on the device before reading the previous step's tokens, so the device never waits
    # for the host's scheduling, detokenizing and input building (vLLM's async scheduling); None: on a GPU without
    # tensor parallelism. Same tokens either way; a sequence that ends by a stop token costs one wasted row.
    async_scheduling: bool | None = None
    # "safetensors", or "dummy": random weights of the config's shape, no checkpoint read (mixr.checkpoint.load_model;
    # vLLM's --load-format dummy), for benchmarks of models too large to write to disk
    load_format: str = "safetensors"

    def __post_init__(self):
        if self.adapter and (self.quantization or self.expert_offload):
            raise ValueError("an adapter is merged into float weights: it does not combine with quantization or "
                             "expert_offload (merge it and save the model first)")
        check_dynamic(self.moe_dynamic, self.moe_top_p, self.moe_entropy_scale, self.moe_k_min, self.moe_k_max)
        if self.expert_offload not in (None, "cpu"):
            raise ValueError(f"unsupported expert_offload {self.expert_offload!r}; use 'cpu' or None")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"unsupported kv_cache_dtype {self.kv_cache_dtype!r}; use 'auto' or 'fp8'")
        if self.gpu_expert_budget_gb < 0:
            raise ValueError(f"gpu_expert_budget_gb must be >= 0, got {self.gpu_expert_budget_gb}")
        if self.expert_offload and self.quantization:
            raise ValueError("expert_offload does not combine with quantization yet")
        if self.quantization not in (None, "int8", "int4", "fp8"):
            raise ValueError(f"unsupported quantization {self.quantization!r}; use 'int8', 'int4' or 'fp8'")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 1 <= self.block_size <= 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two up to 256, got {self.block_size}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {self.tensor_parallel_size!r}")
        if self.parallel_experts not in ("tp", "ep"):
            raise ValueError(f"parallel_experts must be 'tp' or 'ep', got {self.parallel_experts!r}")
        if self.parallel_attention not in ("tp", "dp"):
            raise ValueError(f"parallel_attention must be 'tp' or 'dp', got {self.parallel_attention!r}")
        if self.parallel_attention == "dp" and self.parallel_experts != "ep":
            raise ValueError("parallel_attention='dp' splits the routed experts by expert: set parallel_experts='ep'")
        if self.tensor_parallel_size > 1 and self.async_scheduling:
            raise ValueError("async_scheduling does not combine with tensor_parallel_size > 1 yet")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"unsupported load_format {self.load_format!r}; use one of {', '.join(LOAD_FORMATS)}")
        if self.load_format == "dummy" and (self.adapter or self.expert_offload):
            raise ValueError("load_format='dummy' does not combine with an adapter or expert_offload")
        if self.tensor_parallel_size > 1 and (self.quantization or self.expert_offload):
            raise ValueError("tensor_parallel_size > 1 does not combine with quantization or expert_offload yet")


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "abort"
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # per token: (logprob, top alternatives)
    delta_text: str = ""  # text added by the latest step (streaming)
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_generated_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latency(self) -> float | None:
        if self.finish_time is None or self.first_token_time is None or self.num_generated_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    finished: bool = False

    # the first sample, for the common n == 1 case
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class _Text:
    """Incremental detokenisation of one sample, with stop strings: text that could still begin a stop
    string is held back from streams until it is known not to. When nobody streams and there are no stop
    strings, the text is decoded once at the end instead (per-token decoding costs more than a decode step
    of the model at large batch)."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, out: CompletionOutput, stream: bool):
        self.params, self.out, self.tokenizer = params, out, tokenizer
        self.incremental = stream or bool(params.stop)
        self.decoder = tokenizer.decode_stream(skip_special_tokens=params.skip_special_tokens)
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.full = ""  # all decoded text; out.text is what has been released
        self.stopped = False
        self.ended_by_stop_token = False

    def add(self, token: int, is_stop_token: bool) -> None:
        self.ended_by_stop_token = is_stop_token
        if not self.incremental:
            return
        delta = self.decoder.step(token)
        if not is_stop_token:  # eos / stop-token ids end the text without adding to it
            self.full += delta
        if self.params.stop:
            start = max(0, len(self.full) - len(delta) - self.holdback)
            hits = [i for s in self.params.stop if (i := self.full.find(s, start)) >= 0]
            if hits:
                self.full = self.full[:min(hits)]
                self.stopped = True

    def _decode_all(self) -> str:
        ids = self.out.token_ids[:-1] if self.ended_by_stop_token else self.out.token_ids
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def release(self, finished: bool) -> None:
        if finished and not self.stopped:
            # the stream decoder holds back an incomplete trailing character; the final text is decode()'s
            self.full = self._decode_all()
        if not self.incremental:
            if finished:
                self.out.text = self.out.delta_text = self.full
            return
        end = len(self.full) if finished else max(len(self.out.text), len(self.full) - self.holdback)
        self.out.delta_text = self.full[len(self.out.text):end]
        self.out.text = self.full[:end]


class _Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, seqs: list[Sequence],
                 tokenizer: Tokenizer, arrival: float, stream: bool):
        self.id, self.params, self.seqs = request_id, params, seqs
        outs = [CompletionOutput(i, logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        self.output = RequestOutput(request_id, prompt, outs, RequestMetrics(arrival, num_prompt_tokens=len(prompt)))
        self.texts = [_Text(tokenizer, params, o, stream) for o in outs]


def engine_model(model: CausalLM, device: torch.device, dtype: torch.dtype) -> CausalLM:
    """The module an engine runs for an in-memory model: `model` itself when it already has this device and
    dtype, else a copy with its parameters in `dtype` (buffers keep theirs, like the float32 router bias in
    load_model), so a float32 policy under training and the engine's bf16 weights are separate tensors."""
    weight = model.lm_head.weight
    if weight.device == device and weight.dtype == dtype:
        return model
    out = copy.deepcopy(model).to(device)
    for p in out.parameters():  # assigning .data keeps each Parameter object, so tied weights stay tied
        p.data = p.data.to(dtype)
    return out.requires_grad_(False)


class LLMEngine:
    """`model` is a model directory, or an in-memory CausalLM with its `tokenizer` (device and dtype default to
    the module's own; see `engine_model`). `update_weights` refreshes the weights in place."""

    def __init__(self, model: str | Path | CausalLM, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, config: EngineConfig | None = None,
                 tokenizer: Tokenizer | None = None):
        self.config = config = config or EngineConfig()
        self.workers: Workers | None = None
        if config.tensor_parallel_size > 1:
            if isinstance(model, CausalLM):
                raise ValueError("tensor_parallel_size > 1 loads a model directory on every rank; save the model "
                                 "first (an in-memory model's weights can follow with update_weights)")
            # this process is rank 0: the workers and it each load their shard and build their runner
            self.workers = Workers(model, device, dtype, config)
            self.device, self.model = self.workers.device, self.workers.model
        elif isinstance(model, CausalLM):
            if config.adapter:
                raise ValueError("adapter applies to a model directory; merge it into an in-memory model yourself")
            if config.expert_offload:
                raise ValueError("expert_offload loads from a model directory, not an in-memory model")
            if config.quantization:
                raise ValueError("quantization applies to a model directory; quantize an in-memory model with "
                                 "mixr.quant.quantize_model")
            if tokenizer is None:
                raise ValueError("an in-memory model needs its tokenizer: LLMEngine(model, tokenizer=...)")
            weight = model.lm_head.weight
            self.device = torch.device(device) if device is not None else weight.device
            dtype = weight.dtype if dtype in (None, "auto") else resolve_dtype(dtype, {})
            self.model = engine_model(model, self.device, dtype).eval()
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if config.expert_offload:
                self.model = load_offloaded(model, self.device, dtype, config.gpu_expert_budget_gb).eval()
            else:
                self.model = load_model(model, device=self.device, dtype=dtype, quantization=config.quantization,
                                        load_format=config.load_format).eval()
            if config.adapter:
                from mixr.train.lora import load_adapter, merge_lora
                merge_lora(load_adapter(self.model, config.adapter))
        if config.moe_dynamic and self.workers is None:  # tensor parallel: load_shard set it on every rank
            set_dynamic_experts(self.model, config.moe_dynamic, config.moe_top_p, config.moe_entropy_scale,
                                config.moe_k_min, config.moe_k_max)
        self.tokenizer = tokenizer or Tokenizer.from_dir(model)
        self.max_model_len = config.max_model_len or self.model.config.max_position_embeddings
        dp = self.workers is not None and config.parallel_attention == "dp"
        if self.workers is not None:
            self.runner = (DataParallelRunner if dp else ParallelRunner)(self.workers)
        else:
            self.runner = ModelRunner(self.model, config.block_size, self.max_model_len, config.max_num_seqs,
                                      config.max_num_batched_tokens, config.gpu_memory_utilization,
                                      config.kv_cache_bytes, config.cuda_graphs and not config.expert_offload,
                                      kv_cache_dtype=config.kv_cache_dtype)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size, num_blocks=self.runner.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_chunked_prefill=config.enable_chunked_prefill, max_model_len=self.max_model_len,
            data_parallel_size=config.tensor_parallel_size if dp else 1),
            eos_token_ids=self.tokenizer.stop_token_ids)
        self._async = config.async_scheduling if config.async_scheduling is not None else (
            self.device.type == "cuda" and self.workers is None)
        self._ahead: tuple | None = None  # (batch, sampled rows, PendingSample) queued ahead by the last step
        self.requests: dict[str, _Request] = {}
        self._by_seq: dict[int, tuple[_Request, int]] = {}
        self._rngs: dict[int, random.Random | None] = {}
        self._seq_ids = itertools.count()

    # -- requests ----------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model.config.vocab_size
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens "
                             "and at least one must be left to generate")
        return ids

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    stream: bool = True) -> None:
        """Queue a request; raises ValueError (nothing queued) for a prompt that cannot run.
        stream=False: the caller only reads the finished output, so text is decoded once at the end."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        params = params or SamplingParams()
        ids = self.encode(prompt)
        seqs = [Sequence(next(self._seq_ids), ids, params) for _ in range(params.n)]
        added = []
        try:
            for s in seqs:
                self.scheduler.add(s)
                added.append(s)
        except ValueError:
            for s in added:
                self.scheduler.abort(s.seq_id)
            raise
        req = _Request(request_id, ids, params, seqs, self.tokenizer, seqs[0].arrival_time, stream)
        self.requests[request_id] = req
        for i, s in enumerate(seqs):
            self._by_seq[s.seq_id] = (req, i)
            self._rngs[s.seq_id] = make_rng(params, offset=i)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for s, out in zip(req.seqs, req.output.outputs):
            self.scheduler.abort(s.seq_id)
            out.finish_reason = out.finish_reason or "abort"
            self._forget(s)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @torch.no_grad()
    def update_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy new values into the model's parameters and buffers in place, converting dtype and device on the
        fly, then forget the prefix cache (its KV came from the old weights). In place, because captured CUDA
        graphs read the weights at fixed addresses. `weights`: a state dict or (name, tensor) pairs under the
        model's own names (e.g. `policy.named_parameters()` of a module of the same architecture); a subset is
        fine; under tensor parallelism they are the full, unsharded tensors. Refused while requests are running.
        Returns the number of tensors copied."""
        if self.requests:
            raise RuntimeError(f"cannot update weights while {len(self.requests)} requests are running")
        if self.workers is not None:  # tensor parallel: full tensors in, every rank copies its shard
            n = self.workers.update_weights(weights)
        else:
            own = dict(self.model.named_parameters(remove_duplicate=False)) | dict(self.model.named_buffers())
            n = 0
            for name, value in (weights.items() if isinstance(weights, Mapping) else weights):
                dst = own.get(name)
                if dst is None:
                    raise ValueError(f"update_weights: the model has no tensor {name!r}")
                if dst.shape != value.shape:
                    raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, the model's is "
                                     f"{tuple(dst.shape)}")
                dst.copy_(value)
                n += 1
        if not self.scheduler.block_manager.reset_prefix_cache():  # unreachable with no request running
            raise RuntimeError("KV blocks are still in use; the prefix cache cannot be reset")
        return n

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (garbage collection and interpreter exit do it too)."""
        if self.workers is not None:
            self.workers.close()

    def _forget(self, seq: Sequence) -> None:
        self._by_seq.pop(seq.seq_id, None)
        self._rngs.pop(seq.seq_id, None)

    # -- one step ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the requests that got new tokens or finished (their delta_* fields hold
        what this step added). With async scheduling, when the step is all decodes the next one is planned and
        queued on the device before this one's tokens are read (`Scheduler.schedule_ahead`)."""
        if self._ahead is not None:
            (batch, rows, pending), self._ahead = self._ahead, None
        else:
            batch = self.scheduler.schedule()
            if not batch.seqs:
                return []
            rows, pending = self._run(batch)
        if self._async and pending is not None and all(
                n == 1 and not s.params.penalized and s.params.watermark is None  # these need the tokens now
                for s, n in zip(batch.seqs, batch.num_new_tokens)):
            if (nxt := self.scheduler.schedule_ahead(batch)) is not None:
                ids = pending.token_ids  # an all-decode step samples every row, in batch order
                if len(nxt.seqs) < len(batch.seqs):
                    row = {s.seq_id: i for i, s in enumerate(batch.seqs)}
                    ids = ids[torch.tensor([row[s.seq_id] for s in nxt.seqs], device=ids.device)]
                self._ahead = (nxt, *self._run(nxt, ids))
        tokens: list[int | None] = [None] * len(batch.seqs)
        lps: list = [None] * len(batch.seqs)
        if pending is not None:
            sampled = pending.result()
            for j, i in enumerate(rows):
                tokens[i], lps[i] = sampled.token_ids[j], sampled.logprobs[j]
        self.scheduler.postprocess(batch, tokens)
        outputs = self._update_outputs(batch, tokens, lps)
        if self._ahead is not None and all(s.is_finished for s in self._ahead[0].seqs):
            self._ahead = None  # every sequence in it ended with this step: nothing to read
        return outputs

    def _run(self, batch, next_ids: torch.Tensor | None = None) -> tuple[list[int], PendingSample | None]:
        """Launch batch's forward and sampling; return the batch rows that sample, in the order of the pending
        tokens. next_ids: a decode batch fed these device tokens (`ModelRunner.decode`)."""
        counts = batch.num_new_tokens
        if max(counts) > 1 and self.runner.fits_decode(batch.seqs, counts):
            decode, prefill = [], []  # short prompt chunks: all of it as decode rows, in a graph
            logits, rows = [self.runner.decode(batch.seqs, counts=counts)], list(range(len(counts)))
        else:
            decode = [i for i, n in enumerate(counts) if n == 1]
            prefill = [i for i, n in enumerate(counts) if n > 1]
            logits, rows = [], []
        if decode:
            seqs = [batch.seqs[i] for i in decode]
            logits.append(self.runner.decode(seqs, next_ids))
            rows += decode
        if prefill:
            logits.append(self.runner.prefill([batch.seqs[i] for i in prefill],
                                              [batch.num_new_tokens[i] for i in prefill]))
            rows += prefill
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        keep = [j for j, i in enumerate(rows) if batch.do_sample[i]]
        if not keep:
            return [], None
        seqs = [batch.seqs[rows[j]] for j in keep]
        reqs = [SampleRequest(s.params, self._rngs[s.seq_id], s.prompt_token_ids,
                              s.token_ids[s.num_prompt_tokens:] if s.params.penalized or s.params.watermark else [])
                for s in seqs]
        return [rows[j] for j in keep], self.runner.sample(logits[keep] if len(keep) < len(rows) else logits, reqs)

    def _update_outputs(self, batch, tokens, lps) -> list[RequestOutput]:
        touched: dict[str, _Request] = {}
        by_seq = self._by_seq
        for i, seq in enumerate(batch.seqs):
            token = tokens[i]
            if token is None or (entry := by_seq.get(seq.seq_id)) is None:
                continue
            req, k = entry
            out, text = req.output.outputs[k], req.texts[k]
            if req.id not in touched:
                if len(req.output.outputs) > 1:
                    for o in req.output.outputs:  # deltas are per step
                        o.delta_text, o.delta_token_ids = "", []
                touched[req.id] = req
                if req.output.metrics.first_token_time is None:
                    req.output.metrics.first_token_time = seq.first_token_time
            out.token_ids.append(token)
            out.delta_token_ids = [token]
            if out.logprobs is not None:
                out.logprobs.append(lps[i])
            finished = seq.is_finished
            text.add(token, finished and seq.finish_reason == "stop")
            if text.stopped and not finished:
                self.scheduler.finish(seq.seq_id, "stop")
                finished = True
            if finished:
                out.finish_reason = seq.finish_reason
            text.release(finished)
        for req in touched.values():
            seqs = req.seqs
            if all(s.is_finished for s in seqs):
                m = req.output.metrics
                m.num_cached_tokens = max(s.num_cached_tokens for s in seqs)
                m.num_generated_tokens = sum(s.num_generated for s in seqs)
                m.finish_time = max(s.finish_time for s in seqs)
                req.output.finished = True
                del self.requests[req.id]
                for s in seqs:
                    self._forget(s)
        return [r.output for r in touched.values()]
