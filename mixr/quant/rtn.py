"""Weight-only integer formats and round-to-nearest quantization.

The packed layout is the one in `mixr.kernels.quant_gemm` (the kernels read it as is):
  int8  per output channel, symmetric: q in -127..127, W = q * s, scales (..., N, 1)
  int4  groups of G consecutive input features per output row, q in 0..15:
          symmetric   W = (q - 8) * s        (no zeros tensor)
          zero point  W = (q - z) * s        zeros (..., N, K // G) uint8
Leading dims are empty for a linear layer and (E,) for stacked experts; every function here works on both.
"""

from dataclasses import dataclass

import torch

from mixr.kernels.quant_gemm import pack_int4

GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """bits 8: per-channel symmetric (group_size None). bits 4: group_size in GROUP_SIZES, optional zero point."""

    bits: int
    group_size: int | None = None
    zero_point: bool = False

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"unsupported bits {self.bits!r}: use 4 (group-wise) or 8 (per-channel)")
        if self.bits == 8:
            if self.group_size is not None:
                raise ValueError(f"int8 is per-channel (one scale per output row); group size {self.group_size} "
                                 "applies to 4 bits only")
            if self.zero_point:
                raise ValueError("int8 is symmetric; a zero point applies to 4 bits only")
        elif self.group_size not in GROUP_SIZES:
            raise ValueError(f"unsupported group size {self.group_size!r} for int4: use "
                             f"{', '.join(map(str, GROUP_SIZES))}")

    def groups(self, K: int, name: str = "weight") -> int:
        """Scale groups per row; raises ValueError naming the layer when K does not split into groups."""
        if self.bits == 8:
            return 1
        if K % self.group_size:
            raise ValueError(f"{name}: {K} input features is not a multiple of group size {self.group_size}")
        return K // self.group_size

    def packed_k(self, K: int) -> int:
        return K if self.bits == 8 else K // 2

    # integer range and the implied zero of the symmetric formats
    @property
    def qmin(self) -> int:
        return -127 if self.bits == 8 else 0

    @property
    def qmax(self) -> int:
        return 127 if self.bits == 8 else 15


def scale_zero(w: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., G) float32, one group per row of the last dim -> scale (...,) float32 (already rounded to `dtype`,
    the dtype it is stored in, so codes are chosen against the scale the kernels will use) and zero (...,)
    float32 (0 for int8, 8 for symmetric int4)."""
    wmax, wmin = w.amax(-1), w.amin(-1)
    if spec.bits == 8:
        scale = torch.maximum(wmax, -wmin) / 127
        zero = torch.zeros_like(scale)
    elif not spec.zero_point:
        # codes -8..7 around 8: fit the positive side to 7 steps and the negative side to 8, no clipping.
        scale = torch.maximum(wmax.clamp(min=0) / 7, -wmin.clamp(max=0) / 8)
        zero = torch.full_like(scale, 8.0)
    else:
        # the range always contains 0, so zero padding and exact zeros stay exact
        wmax, wmin = wmax.clamp(min=0), wmin.clamp(max=0)
        scale = (wmax - wmin) / 15
    tiny = torch.finfo(dtype).tiny
    scale = scale.clamp(min=tiny)  # an all-zero group gets any positive scale
    stored = scale.to(dtype)
    # round the stored scale up, never down, so the group's range still fits the codes: no clipping
    stored = torch.where(stored.float() < scale, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    scale = stored.float()
    if spec.bits == 4 and spec.zero_point:
        zero = (-wmin / scale).round().clamp(0, 15)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round w to integer codes (float32) for a broadcastable scale and zero."""
    return (w / scale).round().add(zero).clamp(spec.qmin, spec.qmax)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, dtype: torch.dtype
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """codes (..., N, K) float32, scale/zero (..., N, groups) -> (qweight, scales, zeros or None) as stored."""
    if spec.bits == 8:
        return codes.to(torch.int8), scale.to(dtype), None
    zeros = zero.to(torch.uint8) if spec.zero_point else None
    return pack_int4(codes.to(torch.uint8)), scale.to(dtype), zeros


@torch.no_grad()
def quantize_rtn(weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype | None = None, name: str = "weight",
                 chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest: weight (..., N, K) -> (qweight, scales, zeros or None), scales in `dtype` (default: the
    weight's). Stacked experts are done `chunk` at a time, so the float32 copies stay small."""
    dtype = dtype or weight.dtype
    if weight.dim() == 3 and weight.shape[0] > chunk:
        parts = [quantize_rtn(weight[i:i + chunk], spec, dtype, name) for i in range(0, weight.shape[0], chunk)]
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))
    K = weight.shape[-1]
    groups = spec.groups(K, name)
    w = weight.float().unflatten(-1, (groups, K // groups))  # (..., N, groups, G)
    scale, zero = scale_zero(w, spec, dtype)
    codes = quantize_codes(w, scale[..., None], zero[..., None], spec).flatten(-2)
    return pack(codes, scale, zero, spec, dtype)
