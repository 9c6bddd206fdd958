"""LLMEngine: requests in, incremental outputs out. step() = schedule, run the model, sample, postprocess."""

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixr.checkpoint import load_model
from mixr.engine.model_runner import ModelRunner
from mixr.engine.scheduler import Scheduler, SchedulerConfig
from mixr.engine.sequence import Sequence
from mixr.sampling import SampleRequest, SamplingParams, make_generator
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

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 1 <= self.block_size <= 256 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two up to 256, got {self.block_size}")


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


class LLMEngine:
    def __init__(self, model: str | Path, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_model(model, device=self.device, dtype=dtype).eval()
        self.tokenizer = Tokenizer.from_dir(model)
        self.max_model_len = config.max_model_len or self.model.config.max_position_embeddings
        self.runner = ModelRunner(self.model, config.block_size, self.max_model_len, config.max_num_seqs,
                                  config.max_num_batched_tokens, config.gpu_memory_utilization,
                                  config.kv_cache_bytes, config.cuda_graphs)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size, num_blocks=self.runner.num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_chunked_prefill=config.enable_chunked_prefill, max_model_len=self.max_model_len),
            eos_token_ids=self.tokenizer.stop_token_ids)
        self.requests: dict[str, _Request] = {}
        self._by_seq: dict[int, tuple[_Request, int]] = {}
        self._generators: dict[int, torch.Generator | None] = {}
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
            self._generators[s.seq_id] = make_generator(params, self.device, offset=i)

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

    def _forget(self, seq: Sequence) -> None:
        self._by_seq.pop(seq.seq_id, None)
        self._generators.pop(seq.seq_id, None)

    # -- one step ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; return the requests that got new tokens or finished (their delta_* fields hold
        what this step added)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        decode = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        prefill = [i for i, n in enumerate(batch.num_new_tokens) if n > 1]
        logits, rows = [], []
        if decode:
            logits.append(self.runner.decode([batch.seqs[i] for i in decode]))
            rows += decode
        if prefill:
            logits.append(self.runner.prefill([batch.seqs[i] for i in prefill],
                                              [batch.num_new_tokens[i] for i in prefill]))
            rows += prefill
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        keep = [j for j, i in enumerate(rows) if batch.do_sample[i]]
        sampled_rows = [rows[j] for j in keep]
        sampled = None
        if keep:
            seqs = [batch.seqs[i] for i in sampled_rows]
            reqs = [SampleRequest(s.params, self._generators[s.seq_id], s.prompt_token_ids,
                                  s.token_ids[s.num_prompt_tokens:] if s.params.penalized or s.params.watermark else [])
                    for s in seqs]
            sampled = self.runner.sample(logits[keep] if len(keep) < len(rows) else logits, reqs)
        tokens: list[int | None] = [None] * len(batch.seqs)
        lps: list = [None] * len(batch.seqs)
        for j, i in enumerate(sampled_rows):
            tokens[i], lps[i] = sampled.token_ids[j], sampled.logprobs[j]
        self.scheduler.postprocess(batch, tokens)
        return self._update_outputs(batch, tokens, lps)

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
