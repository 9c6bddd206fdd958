"""DeepSeek-V3/R1's native FP8 weights: float8_e4m3fn with one float32 `weight_scale_inv` per 128x128 block.

    W[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]      (bn, bk) = weight_block_size

The last block row/column is partial when N or K is not a multiple of the block.
"""

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, N, K = shape
    return (*lead, -(-N // block[0]), -(-K // block[1]))


def _expand(scale_inv: torch.Tensor, N: int, K: int, block: tuple[int, int]) -> torch.Tensor:
    """(..., ceil(N/bn), ceil(K/bk)) -> (..., N, K): each block's scale over its block."""
    return scale_inv.repeat_interleave(block[0], -2)[..., :N, :].repeat_interleave(block[1], -1)[..., :K]


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """float8 weight (..., N, K) and its block scales -> dense (..., N, K) in `dtype` (products in float32)."""
    N, K = weight.shape[-2:]
    if tuple(scale_inv.shape) != scale_shape(tuple(weight.shape), block):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a {tuple(weight.shape)} weight "
                         f"in {block[0]}x{block[1]} blocks needs {scale_shape(tuple(weight.shape), block)}")
    return (weight.float() * _expand(scale_inv.float(), N, K, block)).to(dtype)


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """dense (..., N, K) -> (float8_e4m3fn weight, float32 weight_scale_inv), each block scaled so that its
    absolute maximum maps to 448, as DeepSeek's checkpoints are made."""
    N, K = weight.shape[-2:]
    bn, bk = block
    pn, pk = -(-N // bn) * bn, -(-K // bk) * bk
    w = torch.nn.functional.pad(weight.float(), (0, pk - K, 0, pn - N))
    blocks = w.unflatten(-1, (pk // bk, bk)).unflatten(-3, (pn // bn, bn))  # (..., N/bn, bn, K/bk, bk)
    amax = blocks.abs().amax(dim=(-3, -1))  # (..., N/bn, K/bk)
    scale_inv = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (weight.float() / _expand(scale_inv, N, K, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale_inv
