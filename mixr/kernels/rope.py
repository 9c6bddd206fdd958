"""Rotary embedding applied to q and k in one kernel.

x (B, L, H, D) is rotated by (cos, sin) of shape (B, L, D/2), in float32, and rounded once to x's dtype.
interleaved: the pairs are (x0, x1), (x2, x3), ... (DeepSeek's checkpoints); otherwise (x_i, x_{i+D/2}). Either
way the result is written as [first of each pair | second of each pair], so an interleaved input comes out
de-interleaved: q and k get the same permutation, so q.k is unchanged and the cache stays consistent.

q and k may be strided views (MLA rotates only the rope slice of each head, e.g. q[..., nope:]) and the results may
go to given output views (MLA's absorbed decode writes them straight into the attention query and the cache row),
which saves the copies and concatenations around the rotation. For MLA the same programs can also run the
kv_a_layernorm of the latent (`norm=`), so all of MLA's per-token elementwise work is one launch.

CUDA path (Triton; float32, bf16, fp16; no autograd): one program per token for all heads of q and k; no host sync.
Everything else runs `rope_ref`, plain differentiable PyTorch.
"""

import torch

from mixr.kernels.norm import _rows, rms_norm_ref
from mixr.kernels.norm import triton_inference as _use_triton  # a module attribute: tests patch it per module

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

HAS_TRITON = triton is not None


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False,
             out: torch.Tensor | None = None) -> torch.Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x1.float(), x2.float()
    y = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    return y if out is None else out.copy_(y)


def _check(name: str, x: torch.Tensor, cos: torch.Tensor, out: torch.Tensor | None) -> None:
    if x.dim() != 4 or x.shape[:2] != cos.shape[:2] or x.shape[3] != 2 * cos.shape[2]:
        raise ValueError(f"{name} {tuple(x.shape)} must be (B, L, H, D) with (B, L, D/2) = {tuple(cos.shape)}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"{name}_out {tuple(out.shape)} {out.dtype} must be {tuple(x.shape)} {x.dtype}")


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  interleaved: bool = False, *, q_out: torch.Tensor | None = None, k_out: torch.Tensor | None = None,
                  norm: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q (B, L, Hq, D) and k (B, L, Hk, D) (or None) by cos, sin (B, L, D/2) float32 -> (q_rot, k_rot).

    q_out / k_out: optional tensors of q's / k's shape and dtype to write into (any strides with a unit last
    stride); they must not overlap the inputs.
    norm: optional (x (B, L, N), weight (N,), eps, out (B, L, N)): also write weight * RMSNorm(x) into out, as
    mixr.kernels.norm.rms_norm would, in the same launch.
    """
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    _check("q", q, cos, q_out)
    if k is not None:
        _check("k", k, cos, k_out)
    ts = [t for t in (q, k, q_out, k_out) if t is not None]
    norm_rows = None
    if norm is not None:
        nx, nw, eps, nout = norm
        if nx.shape[:2] != q.shape[:2] or nx.dim() != 3 or nout.shape != nx.shape or nw.shape != nx.shape[2:]:
            raise ValueError(f"norm input {tuple(nx.shape)}, weight {tuple(nw.shape)}, out {tuple(nout.shape)} "
                             f"must be (B, L, N), (N,), (B, L, N) with (B, L) = {tuple(q.shape[:2])}")
        norm_rows = (_rows(nx), _rows(nout))
        ts += [nx, nw, nout]
    fast = (_use_triton(*ts, cos, sin) and all(t.stride(-1) == 1 for t in ts)
            and cos.stride(-1) == 1 and sin.stride(-1) == 1)
    if norm is not None:
        fast = fast and None not in norm_rows and nx.dtype == nw.dtype == nout.dtype
    if not fast:
        if norm is not None:
            rms_norm_ref(nx, nw, eps, nout)
        return (rope_ref(q, cos, sin, interleaved, q_out),
                None if k is None else rope_ref(k, cos, sin, interleaved, k_out))
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k is not None and k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch_rope(q, k, cos, sin, interleaved, q_out, k_out,
                 None if norm is None else (norm_rows[0], nw, eps, norm_rows[1]))
    return q_out, k_out


if HAS_TRITON:
    from mixr.kernels.norm import _rms_norm_row

    @triton.jit
    def _rope_rows(x_ptr, o_ptr, sxb, sxl, sxh, sob, sol, soh, b, l, H, c, s,
                   HALF: tl.constexpr, H_P2: tl.constexpr, HALF_P2: tl.constexpr, INTERLEAVED: tl.constexpr):
        h = tl.arange(0, H_P2)[:, None]
        i = tl.arange(0, HALF_P2)[None, :]
        mask = (h < H) & (i < HALF)
        x_row = x_ptr + b * sxb + l * sxl + h * sxh
        if INTERLEAVED:
            x1 = tl.load(x_row + 2 * i, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(x_row + i, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + i + HALF, mask=mask, other=0.0).to(tl.float32)
        o_row = o_ptr + b * sob + l * sol + h * soh
        tl.store(o_row + i, (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + i + HALF, (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, nx_ptr, nw_ptr, no_ptr, L, Hq, Hk, N, eps,
                     sqb, sql, sqh, skb, skl, skh, scb, scl, ssb, ssl,
                     sqob, sqol, sqoh, skob, skol, skoh, snx, sno,
                     HALF: tl.constexpr, HALF_P2: tl.constexpr, HQ_P2: tl.constexpr, HK_P2: tl.constexpr,
                     HAS_K: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_N: tl.constexpr):
        t = tl.program_id(0)
        b = (t // L).to(tl.int64)
        l = (t % L).to(tl.int64)
        i = tl.arange(0, HALF_P2)[None, :]
        c = tl.load(cos_ptr + b * scb + l * scl + i, mask=i < HALF, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * ssb + l * ssl + i, mask=i < HALF, other=0.0).to(tl.float32)
        _rope_rows(q_ptr, qo_ptr, sqb, sql, sqh, sqob, sqol, sqoh, b, l, Hq, c, s,
                   HALF, HQ_P2, HALF_P2, INTERLEAVED)
        if HAS_K:
            _rope_rows(k_ptr, ko_ptr, skb, skl, skh, skob, skol, skoh, b, l, Hk, c, s,
                       HALF, HK_P2, HALF_P2, INTERLEAVED)
        if HAS_NORM:  # norm rows are token-major: row t of (B*L, N)
            cols = tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(nx_ptr + t.to(tl.int64) * snx + cols, mask=mask, other=0.0)
            _rms_norm_row(x, nw_ptr, no_ptr + t.to(tl.int64) * sno, cols, mask, N, eps)


def _launch_rope(q, k, cos, sin, interleaved, q_out, k_out, norm=None) -> None:
    """norm: None or (x (B*L, N), weight, eps, out (B*L, N)), rows with unit column stride."""
    B, L, Hq, D = q.shape
    if B * L == 0:
        return
    has_k = k is not None
    Hk = k.shape[2] if has_k else 0
    kk, ko = (k, k_out) if has_k else (q, q_out)  # placeholders, never read when HAS_K is off
    nx, nw, eps, no = norm if norm is not None else (q, q, 0.0, q)  # likewise for HAS_NORM
    N = nx.shape[1] if norm is not None else 1
    half = D // 2
    p2 = triton.next_power_of_2
    _rope_kernel[(B * L,)](
        q, kk, cos, sin, q_out, ko, nx, nw, no, L, Hq, Hk, N, eps,
        *q.stride()[:3], *kk.stride()[:3], *cos.stride()[:2], *sin.stride()[:2],
        *q_out.stride()[:3], *ko.stride()[:3], nx.stride(0), no.stride(0),
        HALF=half, HALF_P2=p2(half), HQ_P2=p2(Hq), HK_P2=p2(max(Hk, 1)), HAS_K=has_k, INTERLEAVED=interleaved,
        HAS_NORM=norm is not None, BLOCK_N=p2(N), num_warps=4 if max(Hq * half, N) <= 4096 else 8)


def _launch_rope_ref(q, k, cos, sin, interleaved, q_out, k_out, norm=None) -> None:
    """_launch_rope in plain PyTorch (tests, and bench/count_decode_ops.py, stand it in for the kernel)."""
    rope_ref(q, cos, sin, interleaved, q_out)
    if k is not None:
        rope_ref(k, cos, sin, interleaved, k_out)
    if norm is not None:
        nx, nw, eps, no = norm
        rms_norm_ref(nx, nw, eps, no)
