"""Output audit: per-response confidence statistics from the engine's logprobs, and an append-only JSONL log.

The engine returns, per generated token, (chosen logprob, [(token_id, logprob), ...] top alternatives) from
the model's own distribution (before temperature, penalties or watermark bias).

Entropy is estimated from the top-k alternatives: the k listed probabilities (plus the chosen token's when it
is not among them) are exact; the unlisted remainder r = 1 - sum(p) is spread over tokens each no likelier than
m = min(smallest listed p, r), so it adds at least r log(1/m):  H >= -sum p log p + r log(1/m).
We report this lower bound. It is exact when r is 0 and when the tail is flat at the level of the last listed
token (a uniform distribution gives log V exactly); it is tighter the larger k (the engine gives up to 20).
"""

import json
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass(slots=True)
class AuditConfig:
    """prob_threshold: tokens below this probability form the low-probability spans; max_spans: how many to
    report (lowest joint probability first). A response is low-confidence when its mean entropy (nats) is
    over max_mean_entropy, or its fraction of low-probability tokens over max_low_prob_fraction.
    log_path: the JSONL audit log (None: no log). The server computes the statistics of every response
    unless enabled is false, asking the engine for top_logprobs alternatives per token (more: a tighter
    entropy bound; the client still gets only the logprobs it asked for)."""

    prob_threshold: float = 0.1
    max_spans: int = 5
    max_mean_entropy: float = 2.5
    max_low_prob_fraction: float = 0.3
    log_path: str | None = None
    enabled: bool = True
    top_logprobs: int = 20

    def __post_init__(self):
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in 0..20 (the engine's limit), got {self.top_logprobs}")
        if not 0 < self.prob_threshold < 1:
            raise ValueError(f"prob_threshold must be in (0, 1), got {self.prob_threshold}")
        if self.max_spans < 0:
            raise ValueError(f"max_spans must be >= 0, got {self.max_spans}")


@dataclass(slots=True)
class Span:
    token_start: int  # token indices [start, end)
    token_end: int
    char_start: int  # offsets into the response text (as streamed)
    char_end: int
    text: str
    logprob: float  # joint log probability of the span
    min_prob: float


@dataclass(slots=True)
class AuditStats:
    num_tokens: int
    mean_entropy: float
    max_entropy: float
    mean_logprob: float
    low_prob_fraction: float
    spans: list[Span] = field(default_factory=list)
    low_confidence: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def token_entropy(chosen_id: int | None, step: TokenLogprob) -> float:
    """Entropy (nats) of one step's distribution, lower-bounded from its top alternatives (see module doc)."""
    chosen_lp, top = step
    probs = {t: math.exp(lp) for t, lp in top}
    # without its id, the chosen token is taken to be listed when a listed logprob equals its own
    listed = chosen_id in probs if chosen_id is not None else any(math.isclose(lp, chosen_lp) for _, lp in top)
    if not listed:
        probs[-1 if chosen_id is None else chosen_id] = math.exp(chosen_lp)
    rest = max(0.0, 1.0 - sum(probs.values()))
    h = -sum(p * math.log(p) for p in probs.values() if p > 0)
    return h - rest * math.log(min([rest, *(p for p in probs.values() if p > 0)])) if rest > 0 else h


def _char_offsets(token_ids: list[int], tokenizer) -> tuple[list[int], str]:
    # offsets[i]: where token i's text starts in the streamed text (the incremental decoder's deltas)
    stream, offsets, pieces, n = tokenizer.decode_stream(), [], [], 0
    for t in token_ids:
        offsets.append(n)
        pieces.append(stream.step(t))
        n += len(pieces[-1])
    return offsets + [n], "".join(pieces)


def audit_response(logprobs: list[TokenLogprob], token_ids: list[int] | None = None, tokenizer=None,
                   text: str | None = None, cfg: AuditConfig | None = None) -> AuditStats:
    """Statistics of one generated sample. token_ids lets the chosen token count in the entropy when it is
    outside the top alternatives; with tokenizer (and token_ids) spans get their text and char offsets in
    `text` (default: the decoded tokens)."""
    cfg = cfg or AuditConfig()
    n = len(logprobs)
    if n == 0:
        return AuditStats(0, 0.0, 0.0, 0.0, 0.0)
    ids = token_ids if token_ids is not None and len(token_ids) == n else None
    ent = [token_entropy(ids[i] if ids else None, s) for i, s in enumerate(logprobs)]
    lps = [s[0] for s in logprobs]
    low_lp = math.log(cfg.prob_threshold)
    runs, i = [], 0
    while i < n:  # contiguous runs below the threshold
        if lps[i] < low_lp:
            j = i
            while j < n and lps[j] < low_lp:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    runs.sort(key=lambda r: sum(lps[r[0]:r[1]]))
    offsets = None
    if ids and tokenizer is not None:
        offsets, streamed = _char_offsets(ids, tokenizer)
        text = streamed if text is None else text
    spans = []
    for a, b in runs[:cfg.max_spans]:
        ca, cb = (offsets[a], offsets[b]) if offsets else (-1, -1)  # -1: no tokenizer to place the span
        spans.append(Span(a, b, ca, cb, text[ca:cb] if offsets else "", sum(lps[a:b]), math.exp(min(lps[a:b]))))
    low_frac = sum(lp < low_lp for lp in lps) / n
    stats = AuditStats(n, sum(ent) / n, max(ent), sum(lps) / n, low_frac, spans)
    if stats.mean_entropy > cfg.max_mean_entropy:
        stats.reasons.append(f"mean entropy {stats.mean_entropy:.2f} > {cfg.max_mean_entropy}")
    if low_frac > cfg.max_low_prob_fraction:
        stats.reasons.append(f"low-probability tokens {low_frac:.2f} > {cfg.max_low_prob_fraction}")
    stats.low_confidence = bool(stats.reasons)
    return stats


# Field names whose values are never logged, and values that look like credentials wherever they appear.
_SECRET_KEY = re.compile(r"api[_-]?key|authorization|secret|passw|cookie|credential|bearer|(^|[_-])(key|token)$",
                         re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(?:sk|pk|rk|hf|ghp|xox[bp])[-_][A-Za-z0-9_\-]{8,}|\bBearer\s+\S+",
                           re.IGNORECASE)
REDACTED = "[redacted]"


def scrub(obj, secrets: tuple[str, ...] = ()):
    """A copy of obj (dicts, lists, scalars) without secret-named fields and with secret-looking strings and
    the given secret values redacted."""
    if isinstance(obj, dict):
        return {k: scrub(v, secrets) for k, v in obj.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
        return _SECRET_VALUE.sub(REDACTED, obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    return scrub(str(obj), secrets)


class AuditLog:
    """Append-only JSONL: one record per response, written with a single O_APPEND write (whole lines even
    with several writers), file mode 0600. `secrets` (API keys, the watermark key, ...) are redacted from
    every record in addition to the secret-looking fields and values scrub() removes."""

    def __init__(self, path: str | Path, secrets: list[str] | tuple[str, ...] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.secrets = tuple(s for s in secrets if s)
        self._lock = threading.Lock()

    def write(self, request_id: str, model: str, filter_decisions: list | None = None,
              audit: AuditStats | dict | list | None = None, metadata: dict | None = None) -> dict:
        now = time.time()
        record = {
            "request_id": request_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "model": model,
            "filter": [d if isinstance(d, dict) else asdict(d) for d in filter_decisions or []],
            "audit": audit.to_dict() if isinstance(audit, AuditStats) else audit,
            "metadata": metadata or {},
        }
        record = scrub(record, self.secrets)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return record
