"""GPTQ (Frantar et al., 2022): quantize one input column at a time and push each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's calibration inputs,
H = sum_t x_t x_t^T. It minimises ||X (W - W_q)^T|| on those inputs instead of ||W - W_q||.

Batched over a leading expert dim: stacked experts (E, N, K) with one Hessian per expert (E, K, K), built from
the tokens routed to each expert, run as one loop over K whatever E is.
"""

import torch

from mixr.quant.rtn import QuantSpec, pack, quantize_codes, scale_zero


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H (E, K, K) -> upper Cholesky factor of H^-1 after damping; a column no input ever touched (zero diagonal)
    gets a unit diagonal, so it quantizes by plain rounding."""
    H = H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag[diag <= 0] = 1.0
    mean = diag.mean(-1, keepdim=True)
    for attempt in range(6):  # rank-deficient H (few calibration tokens): damp harder until it factors
        L, info = torch.linalg.cholesky_ex(H + torch.diag_embed((damp * 10 ** attempt) * mean.expand_as(diag)))
        if not info.any():
            break
    else:
        raise RuntimeError("GPTQ: the calibration Hessian is not positive definite even after damping")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


@torch.no_grad()
def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, dtype: torch.dtype | None = None,
                  name: str = "weight", damp: float = 0.01, block: int = 128, act_order: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight (N, K) or (E, N, K); hessian (K, K) or (E, K, K), sum of x x^T over the calibration inputs (scale
    does not matter). Returns the packed (qweight, scales, zeros or None) of `mixr.quant.rtn`, scales in `dtype`.

    act_order: quantize the columns with the largest input energy (diagonal of H) first, so that the error of
    outlier input channels is spread over the many columns still free to absorb it. Groups keep their
    contiguous layout, so their scales are then fixed up front from the original weights ("static groups");
    without act_order, int4 groups get their scale from the error-updated weights when the loop reaches them.
    int8 rows always take theirs from the original row."""
    dtype = dtype or weight.dtype
    stacked = weight.dim() == 3
    W = weight.float().clone() if stacked else weight.float()[None].clone()  # (E, N, K)
    H = hessian.float() if stacked else hessian.float()[None]
    E, N, K = W.shape
    groups = spec.groups(K, name)
    G = K // groups
    block = max(block // G, 1) * G if spec.bits == 4 else block  # group starts fall on block starts
    static = spec.bits == 8 or act_order
    if static:
        scales, zeros = scale_zero(W.unflatten(-1, (groups, G)), spec, dtype)  # (E, N, groups)
        col_scale, col_zero = scales.repeat_interleave(G, -1), zeros.repeat_interleave(G, -1)  # (E, N, K)
    else:
        scales = torch.empty(E, N, groups, device=W.device)
        zeros = torch.empty_like(scales)
    if act_order:
        perm = H.diagonal(dim1=-2, dim2=-1).argsort(dim=-1, descending=True)  # (E, K)
        cols = perm[:, None, :].expand(E, N, K)
        W, col_scale, col_zero = W.gather(2, cols), col_scale.gather(2, cols), col_zero.gather(2, cols)
        H = H.gather(1, perm[:, :, None].expand(E, K, K)).gather(2, perm[:, None, :].expand(E, K, K))
    U = _inverse_hessian_factor(H, damp)  # (E, K, K)
    codes = torch.empty_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, :, i1:i2].clone()
        err1 = torch.empty_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                s, z = col_scale[:, :, col], col_zero[:, :, col]
            elif col % G == 0:
                s, z = scale_zero(W1[:, :, i:i + G], spec, dtype)  # (E, N)
                scales[:, :, col // G], zeros[:, :, col // G] = s, z
            w = W1[:, :, i]
            q = quantize_codes(w, s, z, spec)
            codes[:, :, col] = q
            err = (w - (q - z) * s) / U1[:, i, i, None]  # (E, N)
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            err1[:, :, i] = err
        W[:, :, i2:] -= err1 @ U[:, i1:i2, i2:]  # the block's error, pushed onto the later columns at once
    if act_order:
        codes = torch.empty_like(codes).scatter_(2, cols, codes)  # back to the original column order
    qweight, scales, zeros = pack(codes, scales, zeros, spec, dtype)
    if not stacked:
        qweight, scales = qweight[0], scales[0]
        zeros = None if zeros is None else zeros[0]
    return qweight, scales, zeros
