"""Rotary embedding applied to q and k in one kernel.

x (B, L, H, D) is rotated by (cos, sin) of shape (B, L, D/2), in float32, and rounded once to x's dtype.
interleaved: the pairs are (x0, x1), (x2, x3), ... (DeepSeek's checkpoints); otherwise (x_i, x_{i+D/2}). Either
way the result is written as [first of each pair | second of each pair], so an interleaved input comes out
de-interleaved: q and k get the same permutation, so q.k is unchanged and the cache stays consistent.

q and k may be strided views (MLA rotates only the rope slice of each head, e.g. q[..., nope:]) and the results may
go to given output views (MLA's absorbed decode writes them straight into the attention query and the cache row),
which saves the copies and concatenations around the rotation. For MLA the same programs can also run the
kv_a_layernorm of the latent (`norm=`), so all of MLA's per-token elementwise work is one launch, can write the
rotated key and the normed latent into rows picked per token (`out_slots=`): the paged cache's slots, which saves
the cache store's own launch, and can run absorbed MLA's query product q_nope @ W_UK (`absorb=`) in more programs of
the same launch for a batch of a few tokens (ABSORB_CONFIG; one bmm for more).

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

# absorb= inside the rope launch for up to max_tokens tokens (each program holds a (Dn, BLOCK_R) slice of one head's
# W_UK and runs every token through it; past a few tokens one bmm reads the weights better). Tuned by
# bench/tune_mla_decode.py on V2-Lite's shape (16 heads, Dn 128, R 512; H100): one token 3.1 us against 5.8 for the
# rope launch and the bmm, four 5.2 against 6.2, eight 7.8 against 6.2.
ABSORB_CONFIG = dict(max_tokens=4, BLOCK_R=64)


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
                  norm: tuple | None = None, out_slots: torch.Tensor | None = None,
                  absorb: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q (B, L, Hq, D) and k (B, L, Hk, D) (or None) by cos, sin (B, L, D/2) float32 -> (q_rot, k_rot).

    q_out / k_out: optional tensors of q's / k's shape and dtype to write into (any strides with a unit last
    stride); they must not overlap the inputs.
    norm: optional (x (B, L, N), weight (N,), eps, out (B, L, N)): also write weight * RMSNorm(x) into out, as
    mixr.kernels.norm.rms_norm would, in the same launch.
    out_slots: optional (B*L,) int64 row indices: k_out is then (rows, Hk, D) and norm's out (rows, N), and token
    (b, l)'s results go to row out_slots[b * L + l] of each (a scatter, as into a paged cache); returns k_out whole.
    absorb: optional (x (B, L, H, Dn), w (H, Dn, R), out (B, L, H, R)): also out[b, l, h] = x[b, l, h] @ w[h]
    (absorbed MLA's q_nope W_UK); out must view its (B*L, H, R) rows without a copy and not overlap the inputs.
    """
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    _check("q", q, cos, q_out)
    if out_slots is not None:
        B, L = q.shape[:2]
        if (k is None or k_out is None or out_slots.shape != (B * L,) or out_slots.dtype != torch.int64
                or k_out.dim() != 3 or k_out.shape[1:] != k.shape[2:] or k_out.dtype != k.dtype
                or (norm is not None and (norm[3].dim() != 2 or norm[3].shape[1] != norm[0].shape[-1]))):
            raise ValueError(f"out_slots (B*L,) int64 needs k and k_out (rows, Hk, D) (and norm out (rows, N)); got "
                             f"slots {tuple(out_slots.shape)} {out_slots.dtype}, k_out "
                             f"{None if k_out is None else tuple(k_out.shape)}")
    elif k is not None:
        _check("k", k, cos, k_out)
    ts = [t for t in (q, k, q_out, k_out) if t is not None]
    norm_rows = None
    if norm is not None:
        nx, nw, eps, nout = norm
        out_ok = nout.shape == nx.shape if out_slots is None else nout.shape[1:] == nx.shape[2:]
        if nx.shape[:2] != q.shape[:2] or nx.dim() != 3 or not out_ok or nw.shape != nx.shape[2:]:
            raise ValueError(f"norm input {tuple(nx.shape)}, weight {tuple(nw.shape)}, out {tuple(nout.shape)} "
                             f"must be (B, L, N), (N,), (B, L, N) with (B, L) = {tuple(q.shape[:2])}")
        norm_rows = (_rows(nx), _rows(nout))
        ts += [nx, nw, nout]
    fast = (_use_triton(*ts, cos, sin) and all(t.stride(-1) == 1 for t in ts)
            and cos.stride(-1) == 1 and sin.stride(-1) == 1)
    if norm is not None:
        fast = fast and None not in norm_rows and nx.dtype == nw.dtype == nout.dtype
    fast = fast and (out_slots is None or out_slots.is_cuda)
    if absorb is not None:
        ax, aw, aout = absorb
        B, L, H = q.shape[:3]
        if (ax.dim() != 4 or ax.shape[:3] != (B, L, H) or aw.shape != (H, ax.shape[3], aout.shape[-1])
                or aout.shape[:3] != (B, L, H) or len({ax.dtype, aw.dtype, aout.dtype}) != 1):
            raise ValueError(f"absorb x {tuple(ax.shape)}, w {tuple(aw.shape)}, out {tuple(aout.shape)} must be "
                             f"(B, L, H, Dn), (H, Dn, R), (B, L, H, R) of one dtype with (B, L, H) = {(B, L, H)}")
        in_launch = (fast and B * L <= ABSORB_CONFIG["max_tokens"] and _use_triton(ax, aw, aout)
                     and ax.stride(-1) == 1 and aw.stride(-1) == 1 and aout.stride(-1) == 1)
        if not in_launch:
            _absorb_bmm(ax, aw, aout)
            absorb = None
    if not fast:
        if out_slots is not None:
            _scatter_rows_ref(k, cos, sin, interleaved, k_out, norm, out_slots)
            return rope_ref(q, cos, sin, interleaved, q_out), k_out
        if norm is not None:
            rms_norm_ref(nx, nw, eps, nout)
        return (rope_ref(q, cos, sin, interleaved, q_out),
                None if k is None else rope_ref(k, cos, sin, interleaved, k_out))
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if k is not None and k_out is None:
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch_rope(q, k, cos, sin, interleaved, q_out, k_out,
                 None if norm is None else (norm_rows[0], nw, eps, norm_rows[1]), out_slots, absorb)
    return q_out, k_out


def _scatter_rows_ref(k, cos, sin, interleaved, k_out, norm, out_slots) -> None:
    """out_slots in plain PyTorch: rotate k (and norm norm's input), then copy token t's rows to row out_slots[t] of
    k_out (rows, Hk, D) (and of norm's out (rows, N)); norm's input may be (B, L, N) or (B*L, N)."""
    k_out.index_copy_(0, out_slots, rope_ref(k, cos, sin, interleaved).reshape(-1, *k.shape[2:]))
    if norm is not None:
        nx, nw, eps, nout = norm
        nout.index_copy_(0, out_slots, rms_norm_ref(nx, nw, eps).reshape(-1, nx.shape[-1]))


def _absorb_bmm(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, l, h] = x[b, l, h] @ w[h] as one bmm over the heads, written through a view of out's rows."""
    T = x.shape[0] * x.shape[1]
    torch.bmm(x.reshape(T, *x.shape[2:]).transpose(0, 1), w, out=out.view(T, *out.shape[2:]).transpose(0, 1))


if HAS_TRITON:
    from mixr.kernels.norm import _rms_norm_row

    @triton.jit
    def _rope_rows(x_ptr, o_ptr, sxh, soh, H, c, s,
                   HALF: tl.constexpr, H_P2: tl.constexpr, HALF_P2: tl.constexpr, INTERLEAVED: tl.constexpr):
        # x_ptr, o_ptr: this token's first head
        h = tl.arange(0, H_P2)[:, None]
        i = tl.arange(0, HALF_P2)[None, :]
        mask = (h < H) & (i < HALF)
        x_row = x_ptr + h * sxh
        if INTERLEAVED:
            x1 = tl.load(x_row + 2 * i, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(x_row + i, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + i + HALF, mask=mask, other=0.0).to(tl.float32)
        o_row = o_ptr + h * soh
        tl.store(o_row + i, (x1 * c - x2 * s).to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + i + HALF, (x2 * c + x1 * s).to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, nx_ptr, nw_ptr, no_ptr, slot_ptr,
                     ax_ptr, aw_ptr, ao_ptr, L, T, Hq, Hk, N, eps,
                     sqb, sql, sqh, skb, skl, skh, scb, scl, ssb, ssl,
                     sqob, sqol, sqoh, skob, skol, skoh, snx, sno,
                     saxb, saxl, saxh, sawh, sawk, saob, saol, saoh,
                     HALF: tl.constexpr, HALF_P2: tl.constexpr, HQ_P2: tl.constexpr, HK_P2: tl.constexpr,
                     HAS_K: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_N: tl.constexpr,
                     SLOTS: tl.constexpr, ABSORB: tl.constexpr, DN: tl.constexpr, DN_P2: tl.constexpr,
                     R: tl.constexpr, BLOCK_R: tl.constexpr):
        t = tl.program_id(0)
        if ABSORB:
            if t >= T:  # programs past the tokens: (head, slice of R) of out = x @ w, for every token
                j = t - T
                h = j // tl.cdiv(R, BLOCK_R)
                offs_r = (j % tl.cdiv(R, BLOCK_R)) * BLOCK_R + tl.arange(0, BLOCK_R)
                offs_k = tl.arange(0, DN_P2)
                k_mask = offs_k < DN
                w = tl.load(aw_ptr + h * sawh + offs_k[:, None] * sawk + offs_r[None, :],
                            mask=k_mask[:, None] & (offs_r < R)[None, :], other=0.0).to(tl.float32)
                for u in range(0, T):
                    ub = (u // L).to(tl.int64)
                    ul = (u % L).to(tl.int64)
                    x = tl.load(ax_ptr + ub * saxb + ul * saxl + h * saxh + offs_k, mask=k_mask, other=0.0)
                    acc = tl.sum(w * x.to(tl.float32)[:, None], 0)
                    tl.store(ao_ptr + ub * saob + ul * saol + h * saoh + offs_r, acc.to(ao_ptr.dtype.element_ty),
                             mask=offs_r < R)
                return
        b = (t // L).to(tl.int64)
        l = (t % L).to(tl.int64)
        i = tl.arange(0, HALF_P2)[None, :]
        c = tl.load(cos_ptr + b * scb + l * scl + i, mask=i < HALF, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + b * ssb + l * ssl + i, mask=i < HALF, other=0.0).to(tl.float32)
        _rope_rows(q_ptr + b * sqb + l * sql, qo_ptr + b * sqob + l * sqol, sqh, sqoh, Hq, c, s,
                   HALF, HQ_P2, HALF_P2, INTERLEAVED)
        # k's and the norm's outputs: token t's own row, or (SLOTS) row slot[t] of (rows, ...) outputs, whose row
        # stride comes in as skob and sno
        if SLOTS:
            row = tl.load(slot_ptr + t).to(tl.int64)
            k_dst = ko_ptr + row * skob
            n_dst = no_ptr + row * sno
        else:
            k_dst = ko_ptr + b * skob + l * skol
            n_dst = no_ptr + t.to(tl.int64) * sno
        if HAS_K:
            _rope_rows(k_ptr + b * skb + l * skl, k_dst, skh, skoh, Hk, c, s, HALF, HK_P2, HALF_P2, INTERLEAVED)
        if HAS_NORM:  # norm rows are token-major: row t of (B*L, N)
            cols = tl.arange(0, BLOCK_N)
            mask = cols < N
            x = tl.load(nx_ptr + t.to(tl.int64) * snx + cols, mask=mask, other=0.0)
            _rms_norm_row(x, nw_ptr, n_dst, cols, mask, N, eps)


def _launch_rope(q, k, cos, sin, interleaved, q_out, k_out, norm=None, out_slots=None, absorb=None,
                 block_r=None) -> None:
    """norm: None or (x (B*L, N), weight, eps, out (B*L, N)), rows with unit column stride. out_slots: None or
    (B*L,) int64, with k_out (rows, Hk, D) and norm's out (rows, N) (see apply_rope_qk). absorb: None or (x, w, out)
    with unit last strides, run by cdiv(R, block_r) more programs per head (default ABSORB_CONFIG's)."""
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
    slots = out_slots is not None
    ko_strides = (ko.stride(0), 0, ko.stride(1)) if slots else ko.stride()[:3]
    ax, aw, ao = absorb if absorb is not None else (q, q, q)  # placeholders when ABSORB is off
    Dn, R = (aw.shape[1], aw.shape[2]) if absorb is not None else (1, 1)
    block_r = min(block_r or ABSORB_CONFIG["BLOCK_R"], p2(R))
    extra = Hq * triton.cdiv(R, block_r) if absorb is not None else 0
    _rope_kernel[(B * L + extra,)](
        q, kk, cos, sin, q_out, ko, nx, nw, no, out_slots if slots else cos, ax, aw, ao, L, B * L, Hq, Hk, N, eps,
        *q.stride()[:3], *kk.stride()[:3], *cos.stride()[:2], *sin.stride()[:2],
        *q_out.stride()[:3], *ko_strides, nx.stride(0), no.stride(0),
        *ax.stride()[:3], *aw.stride()[:2], *ao.stride()[:3],
        HALF=half, HALF_P2=p2(half), HQ_P2=p2(Hq), HK_P2=p2(max(Hk, 1)), HAS_K=has_k, INTERLEAVED=interleaved,
        HAS_NORM=norm is not None, BLOCK_N=p2(N), SLOTS=slots, ABSORB=absorb is not None, DN=Dn, DN_P2=p2(Dn), R=R,
        BLOCK_R=block_r, num_warps=4 if max(Hq * half, N) <= 4096 else 8)


def _launch_rope_ref(q, k, cos, sin, interleaved, q_out, k_out, norm=None, out_slots=None, absorb=None,
                     block_r=None) -> None:
    """_launch_rope in plain PyTorch (tests, and bench/count_decode_ops.py, stand it in for the kernel)."""
    rope_ref(q, cos, sin, interleaved, q_out)
    if absorb is not None:
        _absorb_bmm(*absorb)
    if out_slots is not None:
        _scatter_rows_ref(k, cos, sin, interleaved, k_out, norm, out_slots)
        return
    if k is not None:
        rope_ref(k, cos, sin, interleaved, k_out)
    if norm is not None:
        nx, nw, eps, no = norm
        rms_norm_ref(nx, nw, eps, no)
