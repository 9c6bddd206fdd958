"""RMSNorm, and residual add + RMSNorm, as one kernel each.

The math is the PyTorch RMSNorm's (mixr.layers.norm), rounding included: normalise in float32, round to the input
dtype, then multiply by the weight (the product rounded once). add_rms_norm first forms the residual stream
x + residual in the input dtype, as `x = x + sublayer(x)` does, and normalises that rounded sum, so carrying the
residual between sublayers changes no value. In the style of vLLM's fused_add_rms_norm, but not in place.

CUDA path (Triton; float32, bf16, fp16; no autograd): one program per row, the whole row in registers, no host sync
(CUDA-graph capturable). Everything else runs the `_ref` functions, which are plain PyTorch and differentiable.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

HAS_TRITON = triton is not None
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_inference(*tensors: torch.Tensor) -> bool:
    """Triton present, every tensor on CUDA, and no autograd that would need a backward: the kernels of
    norm, rope and router have none, so they run only there."""
    return (HAS_TRITON and all(t.is_cuda for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _use_triton(*tensors: torch.Tensor) -> bool:
    return triton_inference(*tensors) and all(t.dtype in _DTYPES for t in tensors)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(dtype)
    return y if out is None else out.copy_(y)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as a (rows, N) view with unit column stride, or None where its strides allow no such view."""
    if x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be ({x.shape[-1]},), the last dim of x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have the shape of x {tuple(x.shape)}")
    devices = {t.device for t in (x, weight) + (() if residual is None else (residual,))}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight * RMSNorm(x) over the last dim of x (..., N), in x's dtype promoted with weight's.

    out: an optional tensor of x's shape to write into (any strides; e.g. a slice of a larger buffer). It must not
    overlap x.
    """
    _check(x, weight)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is not None and (out.shape != x.shape or out.dtype != dtype):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must be {tuple(x.shape)} {dtype}")
    x2 = _rows(x)
    o2 = None if out is None else _rows(out)
    if not _use_triton(x, weight) or weight.dtype != x.dtype or x2 is None or (out is not None and o2 is None):
        return rms_norm_ref(x, weight, eps, out)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        o2 = out.view(-1, x.shape[-1])
    _launch_rms_norm(x2, None, weight, eps, o2, None)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(x + residual), x + residual): the residual stream's update and the next sublayer's input.

    The sum is rounded to x's dtype before it is normalised, as `x = x + sublayer(x)` followed by a norm rounds it.
    """
    _check(x, weight, residual)
    x2, r2 = _rows(x), _rows(residual)
    # mixed dtypes (autocast: a bf16 sublayer output onto a float32 stream) promote, as `x + residual` does
    if (not _use_triton(x, residual, weight) or not x.dtype == residual.dtype == weight.dtype or x2 is None
            or r2 is None):
        return add_rms_norm_ref(x, residual, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    N = x.shape[-1]
    _launch_rms_norm(x2, r2, weight, eps, out.view(-1, N), new_residual.view(-1, N))
    return out, new_residual


if HAS_TRITON:

    @triton.jit
    def _rms_norm_row(x, w_ptr, out_row, cols, mask, N, eps):
        """Normalise one loaded row x (in the input dtype) and store weight * it at out_row + cols."""
        h = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(h * h, 0) / N + eps)
        # round the normalised row to the input dtype before the weight multiply, as the PyTorch path does
        h = (h * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, (h * w).to(out_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, N, eps,
                         stride_x, stride_r, stride_o, stride_ro,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
            # the residual stream is kept in the input dtype: round the sum before normalising it
            x = (x.to(tl.float32) + r.to(tl.float32)).to(r_out_ptr.dtype.element_ty)
            tl.store(r_out_ptr + row * stride_ro + cols, x, mask=mask)
        _rms_norm_row(x, w_ptr, out_ptr + row * stride_o, cols, mask, N, eps)


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out: torch.Tensor, residual_out: torch.Tensor | None) -> None:
    """x, residual, out, residual_out: (rows, N) with unit column stride."""
    M, N = x.shape
    if M == 0:
        return
    block = triton.next_power_of_2(N)
    has_r = residual is not None
    _rms_norm_kernel[(M,)](
        x, residual if has_r else x, weight, out, residual_out if has_r else out, N, eps,
        x.stride(0), residual.stride(0) if has_r else 0, out.stride(0), residual_out.stride(0) if has_r else 0,
        HAS_RESIDUAL=has_r, BLOCK_N=block, num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16)


def _launch_rms_norm_ref(x, residual, weight, eps, out, residual_out) -> None:
    """_launch_rms_norm in plain PyTorch (tests, and bench/count_decode_ops.py, stand it in for the kernel)."""
    if residual is None:
        rms_norm_ref(x, weight, eps, out)
    else:
        y, r = add_rms_norm_ref(x, residual, weight, eps)
        out.copy_(y)
        residual_out.copy_(r)
