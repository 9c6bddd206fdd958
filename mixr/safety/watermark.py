"""Green-list text watermark in the style of Kirchenbauer et al. 2023 ("A Watermark for Large Language Models").

At each step a keyed hash of the previous token(s) and of each candidate token splits the vocabulary into a
green fraction gamma and a red rest; the sampler adds delta to the green logits. Detection re-tokenizes the
text, counts green tokens and returns a one-proportion z-score; it needs the key and the tokenizer, not the model.

The hash is integer arithmetic only (no torch RNG, no uint64): every value stays below 2**32 and every
multiplier below 2**31, so products stay below 2**63 and int64 never overflows. The same expression runs on
Python ints (detection), CPU tensors and GPU tensors and gives the same bits everywhere.
"""

import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

_M32 = 0xFFFFFFFF
HASHINGS = ("lefthash", "minhash", "selfhash")


def mix32(x):
    """A 32-bit integer finaliser (xorshift-multiply, lowbias32-style); x: int or int64 tensor in [0, 2**32).
    Multipliers are odd and < 2**31 so that x * C < 2**63: exact in int64 on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


@dataclass(slots=True)
class WatermarkConfig:
    """key: the secret (int or str; 42 and "42" are the same key). gamma: green fraction of the vocabulary.
    delta: logit bias added to green tokens. context_width h: how many previous tokens seed the green list.
    hashing: "lefthash" (ordered hash of the h previous tokens; h=1 is the paper's default), "minhash" (the min
    of per-token hashes over the h previous tokens: an edit that keeps the minimum keeps the green list), or
    "selfhash" (minhash over the h previous tokens *and the candidate itself*, anchored on the earliest
    context token: the paper's self-seeding variant, more robust to edits at the same h)."""

    key: int | str = field(repr=False)  # a secret: kept out of repr, so it never lands in error messages or logs
    gamma: float = 0.25
    delta: float = 2.0
    context_width: int = 1
    hashing: str = "lefthash"
    key_hash: int = field(init=False, repr=False, default=0)

    def __post_init__(self):
        if isinstance(self.key, bool) or not isinstance(self.key, (int, str)) or self.key == "":
            raise ValueError("watermark key must be a non-empty string or an int")
        if not 0 < self.gamma < 1:
            raise ValueError(f"watermark gamma must be in (0, 1), got {self.gamma}")
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise ValueError(f"watermark delta must be finite and >= 0, got {self.delta}")
        if not 1 <= self.context_width <= 16:
            raise ValueError(f"watermark context_width must be in 1..16, got {self.context_width}")
        if self.hashing not in HASHINGS:
            raise ValueError(f"watermark hashing must be one of {HASHINGS}, got {self.hashing!r}")
        self.key_hash = key_hash(self.key)


def key_hash(key: int | str) -> int:
    # blake2b spreads any key (short ints included) over 32 bits; str() so that the CLI's "42" matches 42.
    return int.from_bytes(hashlib.blake2b(str(key).encode(), digest_size=4).digest(), "little")


def context_seed(cfg: WatermarkConfig, context: list[int]) -> int:
    """The seed of the green list after `context` (its last context_width tokens are used)."""
    ctx = context[-cfg.context_width:]
    if cfg.hashing == "lefthash":
        s = cfg.key_hash
        for t in ctx:  # chained, so the order of the context tokens matters
            s = mix32(s ^ mix32(t))
        return s
    return min(mix32(cfg.key_hash ^ mix32(t)) for t in ctx)


def green_threshold(gamma: float) -> int:
    return int(gamma * 2**32)  # green when the 32-bit hash is below this: a fraction gamma on average


def self_anchor(cfg: WatermarkConfig, context: list[int]) -> int:
    # selfhash mixes the min with a hash of the earliest context token (the paper's "anchored" minhash):
    # without it, tokens whose own hash is the min would have one colour whatever the context.
    return mix32(mix32(cfg.key_hash ^ mix32(context[-cfg.context_width:][0])) ^ 0x9E3779B9)


def is_green(cfg: WatermarkConfig, context: list[int], token: int) -> bool:
    """Whether `token` is green after `context` (scalar reference of green_mask, used by detection)."""
    seed = context_seed(cfg, context)
    th = mix32(token)
    if cfg.hashing == "selfhash":
        seed = mix32(min(seed, mix32(cfg.key_hash ^ th)) ^ self_anchor(cfg, context))
    return mix32(seed ^ th) < green_threshold(cfg.gamma)


@lru_cache(maxsize=8)
def _token_hashes(vocab: int, device: torch.device) -> torch.Tensor:
    return mix32(torch.arange(vocab, dtype=torch.int64, device=device))


def green_mask(cfgs: list[WatermarkConfig], contexts: list[list[int]], vocab: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, vocab) bool: the green lists of several rows, one hash of all vocab candidates per row."""
    device = torch.device(device)
    th = _token_hashes(vocab, device)[None, :]  # (1, V)
    seeds = torch.tensor([context_seed(c, x) for c, x in zip(cfgs, contexts)], device=device)[:, None]  # (n, 1)
    if any(c.hashing == "selfhash" for c in cfgs):
        self_rows = torch.tensor([c.hashing == "selfhash" for c in cfgs], device=device)[:, None]
        keys = torch.tensor([c.key_hash for c in cfgs], device=device)[:, None]
        anchors = torch.tensor([self_anchor(c, x) for c, x in zip(cfgs, contexts)], device=device)[:, None]
        seeds = torch.where(self_rows, mix32(torch.minimum(seeds, mix32(keys ^ th)) ^ anchors), seeds)  # (n, V)
    limits = torch.tensor([green_threshold(c.gamma) for c in cfgs], device=device)[:, None]
    return mix32(seeds ^ th) < limits


def apply_watermark(logits: torch.Tensor, rows: list[int], cfgs: list[WatermarkConfig],
                    contexts: list[list[int]]) -> None:
    """Add each row's delta to its green logits, in place; logits (B, vocab) float."""
    mask = green_mask(cfgs, contexts, logits.shape[-1], logits.device)
    delta = torch.tensor([c.delta for c in cfgs], dtype=logits.dtype, device=logits.device)[:, None]
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] += mask.to(logits.dtype) * delta


@dataclass(slots=True)
class Detection:
    z_score: float | None  # None when no token could be scored
    num_tokens_scored: int  # unique (context, token) pairs
    num_green: int
    p_value: float | None  # one-sided: P(z >= z_score) for unwatermarked text
    verdict: str  # "watermarked", "not watermarked" or "too short"


def detect(text_or_ids: str | list[int], tokenizer=None, key: int | str | None = None, gamma: float = 0.25,
           context_width: int = 1, hashing: str = "lefthash", threshold: float = 4.0,
           min_tokens: int = 16, config: WatermarkConfig | None = None) -> Detection:
    """Score a text (tokenized with `tokenizer`, no special tokens added) or a list of token ids.

    Each unique (context, token) pair is scored once, so repeated n-grams (which a watermarked model and a
    human both repeat) do not inflate the count. z = (G - gamma T) / sqrt(T gamma (1 - gamma)) over T scored
    pairs with G green; the verdict is "watermarked" when z > threshold, "too short" under min_tokens scored
    pairs (z and p are still reported when T > 0). `config` replaces key/gamma/context_width/hashing."""
    cfg = config or WatermarkConfig(key=key, gamma=gamma, context_width=context_width, hashing=hashing)
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError("detecting on text needs a tokenizer (or pass token ids)")
        ids = tokenizer.encode(text_or_ids, add_special_tokens=False)
    else:
        ids = [int(t) for t in text_or_ids]
    h = cfg.context_width
    pairs = {(tuple(ids[i - h:i]), ids[i]) for i in range(h, len(ids))}
    T = len(pairs)
    G = sum(is_green(cfg, list(ctx), tok) for ctx, tok in pairs)
    if T == 0:
        return Detection(None, 0, 0, None, "too short")
    g = cfg.gamma
    z = (G - g * T) / math.sqrt(T * g * (1 - g))
    p = 0.5 * math.erfc(z / math.sqrt(2))
    verdict = "too short" if T < min_tokens else "watermarked" if z > threshold else "not watermarked"
    return Detection(z, T, G, p, verdict)
