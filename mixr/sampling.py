"""Per-request sampling settings and the batched sampler."""

import random
from dataclasses import dataclass, field

import torch

from mixr.safety.watermark import WatermarkConfig, apply_watermark


@dataclass(slots=True)
class SamplingParams:
    """vLLM-style sampling settings. temperature 0 means greedy; top_k <= 0, top_p 1 and min_p 0 switch those
    filters off; penalties of 0 (presence, frequency) or 1 (repetition) are off."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # number of top alternatives to return with each sampled token's logprob
    watermark: WatermarkConfig | None = None  # green-list watermark (mixr.safety.watermark); a dict is converted

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.watermark, dict):
            self.watermark = WatermarkConfig(**self.watermark)
        checks = [(self.n >= 1, "n must be >= 1"),
                  (self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
                  (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
                  (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
                  (self.max_tokens >= 1, "max_tokens must be >= 1"),
                  (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in 0..20"),
                  (all(self.stop), "stop strings must be non-empty"),
                  (self.watermark is None or isinstance(self.watermark, WatermarkConfig),
                   "watermark must be a WatermarkConfig")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"{msg}, got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def make_rng(params: SamplingParams, offset: int = 0) -> random.Random | None:
    """A private random stream per sampled sequence (offset: the sample index for n > 1): one uniform per token,
    so a seeded request's tokens do not depend on what else is in the batch. Unseeded ones draw a fresh seed."""
    if params.greedy:
        return None
    return random.Random(params.seed + offset if params.seed is not None else random.getrandbits(64))


def apply_penalties(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """OpenAI presence/frequency penalties over generated tokens; CTRL repetition penalty over prompt + output."""
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt) | set(output)), device=logits.device, dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if output and (p.presence_penalty or p.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p on one row (vocab,): the reference for filtered_probs."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= p.top_p  # the tokens ranked above already reach top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """filter_logits(row, p).softmax(-1) for every row at once (B, V): one sort for the batch, and only when some
    row asks for top-k or top-p. Ties with the k-th logit are kept, as in filter_logits."""
    B, V = logits.shape
    dev = logits.device
    x = logits / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) < V or min(top_p) < 1:
        vals, order = x.sort(-1, descending=True)
        if min(top_k) < V:
            kth = vals.gather(1, torch.tensor(top_k, device=dev)[:, None] - 1)
            vals = vals.masked_fill(vals < kth, float("-inf"))
        if min(top_p) < 1:
            probs = vals.softmax(-1)
            drop = probs.cumsum(-1) - probs >= torch.tensor(top_p, device=dev)[:, None]
            vals = vals.masked_fill(drop, float("-inf"))
        x = torch.empty_like(x).scatter_(1, order, vals)
    probs = x.softmax(-1)
    min_p = [p.min_p for p in params]
    if max(min_p) > 0:
        floor = torch.tensor(min_p, device=dev)[:, None] * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@dataclass(slots=True)
class SampleRequest:
    params: SamplingParams
    rng: random.Random | None  # make_rng's stream: one uniform per sampled token; None for greedy
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass(slots=True)
class Sampled:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]  # (chosen logprob, top alternatives) per row


def _watermark_context(r: SampleRequest) -> list[int]:
    # the previous h tokens: the prompt's last ones for the first generated tokens
    h, out = r.params.watermark.context_width, r.output_token_ids
    return out[-h:] if len(out) >= h else (r.prompt_token_ids + out)[-h:]


def sample_tokens(logits: torch.Tensor, reqs: list[SampleRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen token of each row as a device tensor (B,), with no host sync, and the float32 logits it came
    from. Greedy rows take the argmax; the others invert their filtered distribution's CDF at one uniform from
    the request's own stream, so a seeded request's tokens do not depend on the batch. The sampled rows are
    filtered and drawn together (a fixed number of kernels, not a few per row: at batch 512 a per-row loop was
    most of a small model's decode step)."""
    logits = raw = logits.float()
    B, V = logits.shape
    marked = [i for i, r in enumerate(reqs) if r.params.watermark is not None]
    penalized = [i for i, r in enumerate(reqs) if r.params.penalized]
    if marked or penalized:
        logits = logits.clone()
    if marked:
        # The bias steers the choice only: returned logprobs stay the model's own (raw), which is what the
        # audit and perplexity want. Added before penalties and temperature, as HF's WatermarkLogitsProcessor.
        apply_watermark(logits, marked, [reqs[i].params.watermark for i in marked],
                        [_watermark_context(reqs[i]) for i in marked])
    for i in penalized:  # rare, and each row needs its own token history
        apply_penalties(logits[i], reqs[i].prompt_token_ids, reqs[i].output_token_ids, reqs[i].params)
    choice = logits.argmax(-1)
    rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
    if rows:
        idx = torch.tensor(rows, device=logits.device)
        probs = filtered_probs(logits[idx], [reqs[i].params for i in rows])
        cdf = probs.cumsum(-1)
        # 1 - random() is in (0, 1]: the target lands on a token of nonzero probability
        u = torch.tensor([1.0 - reqs[i].rng.random() for i in rows], device=logits.device)[:, None]
        pick = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=V - 1)
        choice[idx] = pick[:, 0]
    return choice, raw


class PendingSample:
    """`sample_tokens` and the logprobs the requests ask for, launched but not read: the engine can queue the
    next decode step (fed `token_ids` on the device) before it waits for these on the host."""

    def __init__(self, logits: torch.Tensor, reqs: list[SampleRequest]):
        self.token_ids, raw = sample_tokens(logits, reqs)
        self.logprobs = [r.params.logprobs for r in reqs]
        parts = [self.token_ids]
        if any(n is not None for n in self.logprobs):
            lp = raw.log_softmax(-1)
            top = lp.topk(max(max(n or 0 for n in self.logprobs), 1), dim=-1)
            parts += [lp.gather(1, self.token_ids[:, None])[:, 0], top.values, top.indices]
        self._event = None
        if logits.device.type == "cuda":  # a non-blocking copy to the host (pinned by torch) and its event
            parts = [t.to("cpu", non_blocking=True) for t in parts]
            self._event = torch.cuda.Event()
            self._event.record()
        self._parts = parts
        self._result: Sampled | None = None

    def result(self) -> Sampled:
        """Wait for the tokens (one host sync) and return them with their logprobs."""
        if self._result is None:
            if self._event is not None:
                self._event.synchronize()
            ids = self._parts[0].tolist()
            out = [None] * len(ids)
            if len(self._parts) > 1:
                chosen_l, top_v, top_i = (t.tolist() for t in self._parts[1:])
                out = [None if n is None else (chosen_l[i], list(zip(top_i[i][:n], top_v[i][:n])))
                       for i, n in enumerate(self.logprobs)]
            self._result = Sampled(ids, out)
        return self._result


def sample_batch(logits: torch.Tensor, reqs: list[SampleRequest]) -> Sampled:
    """One token per row of logits (B, vocab), as `sample_tokens` picks it, and the logprobs the requests ask
    for (the chosen token's and the top `logprobs` alternatives). One host sync for the batch."""
    return PendingSample(logits, reqs).result()
