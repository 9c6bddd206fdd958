"""Rotary position embeddings: default, linear, llama3 and YaRN frequency schedules."""

import math

import torch
from torch import nn

from mixr.kernels.rope import apply_rope_qk


def rope_parameters(hf: dict) -> dict:
    """One rope dict from either config.json style.

    transformers 4 (and model publishers) write `rope_theta` plus an optional `rope_scaling` dict with `type`;
    transformers 5 writes `rope_parameters` with `rope_type` and `rope_theta` inside.
    """
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params["rope_type"] = params.get("rope_type") or params.pop("type", None) or "default"
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if params["rope_type"] in ("yarn", "llama3", "longrope"):
        params.setdefault("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    return params


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_scale(params: dict, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the factor that multiplies cos/sin, as transformers computes them."""
    base = float(params["rope_theta"])
    kind = params["rope_type"]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = params["original_max_position_embeddings"]
        factor = params.get("factor") or max_position_embeddings / old_len
        attn = params.get("attention_factor")
        if attn is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            attn = _mscale(factor, m) / _mscale(factor, m_all) if m and m_all else _mscale(factor)
        beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1 where frequencies are kept, 0 where they are interpolated
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(attn)
    raise ValueError(f"unsupported rope type {kind!r} (supported: default, linear, llama3, yarn)")


def yarn_softmax_scale(params: dict) -> float:
    """DeepSeek's extra attention-logit scale under YaRN: mscale(factor, mscale_all_dim) squared."""
    if params["rope_type"] == "yarn" and params.get("mscale_all_dim"):
        return _mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return 1.0


class RotaryEmbedding(nn.Module):
    """Turns positions into (cos, sin) of shape (*positions.shape, dim/2), shared by every layer."""

    def __init__(self, dim: int, params: dict, max_position_embeddings: int):
        super().__init__()
        inv_freq, self.scale = inv_freq_and_scale(params, dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        if self.scale == 1.0:  # most schedules (DeepSeek's YaRN too: its mscales cancel): two kernels fewer a step
            return freqs.cos(), freqs.sin()
        return freqs.cos() * self.scale, freqs.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x (B, L, H, D) by (cos, sin) of shape (B, L, D/2).

    interleaved: pairs are (x0, x1), (x2, x3), ... as in DeepSeek's checkpoints; otherwise (x_i, x_{i+D/2}).
    The interleaved result is written de-interleaved ([evens, odds]); q and k get the same permutation, so
    q.k is unchanged and the cache stays consistent. To rotate q and k together, see apply_rope_qk.
    """
    return apply_rope_qk(x, None, cos, sin, interleaved)[0]
