"""Paged decode attention: one query token per sequence over its cached keys and values.

Token t of sequence b lives at k_cache[block_tables[b, t // block_size], t % block_size]. Query head h reads kv head
h // (Hq // Hkv) (GQA; MQA and MHA are the ends). v_cache may be a strided view of k_cache: absorbed MLA caches one
row [latent | rope key] per token and attends with K = the whole row, V = k_cache[..., :kv_lora_rank].

CUDA path (Triton, bf16/fp16), flash-decoding: program (b, kv head, split) takes one stretch of the context and all
query heads of that kv head (for MLA all 16 heads share the one KV head, so each KV tile is loaded once for all of
them), and keeps an online softmax in fp32. With several splits, a second kernel merges the partial results by their
log-sum-exp. The grid comes from shapes alone (never from context_lens), so there is no host sync and a CUDA graph
can capture it; `max_context_len`, a host-side bound, only sizes the splits.

MLA's output projection (`v_proj`): absorbed MLA multiplies each head's attention output (a latent of
kv_lora_rank values) by that head's W_UV. For small batches the split merge and that product run as one kernel
(program (head, output slice, row) merges the head's partials and multiplies them by its W_UV slice), which saves the
merge's launch and a cuBLAS batched GEMV of 16 tiny matrices; larger batches merge, then run one bmm.

FP8 cache: k_cache/v_cache may be float8_e4m3fn holding K/kv_scale and V/kv_scale (one per-tensor scale). The
kernel loads the e4m3 tiles (half the bytes) and converts them to q's dtype in registers; kv_scale is folded into
the softmax scale and the output. The reference dequantizes the gathered rows.
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

HAS_TRITON = triton is not None



def _check(q, k_cache, v_cache, block_tables, context_lens) -> tuple[int, int, int, int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"expected q (B, Hq, Dk), k_cache (blocks, block_size, Hkv, Dk), v_cache (.., Dv); got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, Hq, Dk = q.shape
    num_blocks, block_size, Hkv, Dk2 = k_cache.shape
    if Dk2 != Dk or tuple(v_cache.shape[:3]) != (num_blocks, block_size, Hkv):
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not match q {tuple(q.shape)}")
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or tuple(context_lens.shape) != (B,):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} must be (B={B}, max_blocks) and context_lens "
                         f"{tuple(context_lens.shape)} must be (B,)")
    if block_tables.dtype not in (torch.int32, torch.int64) or context_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_tables and context_lens must be integer tensors, got {block_tables.dtype}, "
                        f"{context_lens.dtype}")
    if (not q.is_floating_point() or k_cache.dtype != v_cache.dtype
            or k_cache.dtype not in (q.dtype, torch.float8_e4m3fn)):
        raise TypeError(f"q, k_cache and v_cache must share one floating dtype (or the caches float8_e4m3fn); got "
                        f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return B, Hq, Hkv, Dk, v_cache.shape[3], block_size


def _check_proj(v_proj: torch.Tensor | None, Hq: int, Dv: int, q: torch.Tensor) -> None:
    if v_proj is not None and (v_proj.dim() != 3 or v_proj.shape[0] != Hq or v_proj.shape[2] != Dv
                               or v_proj.dtype != q.dtype or v_proj.device != q.device):
        raise ValueError(f"v_proj {tuple(v_proj.shape)} {v_proj.dtype} must be (Hq={Hq}, out, Dv={Dv}) of q's dtype "
                         f"{q.dtype} on its device")


def project_heads(out: torch.Tensor, v_proj: torch.Tensor) -> torch.Tensor:
    """out (B, H, Dv) -> (B, H, Dp): each head's output times its own matrix, v_proj (H, Dp, Dv) (one bmm)."""
    res = out.new_empty(out.shape[0], out.shape[1], v_proj.shape[1])
    torch.bmm(out.transpose(0, 1), v_proj.transpose(1, 2), out=res.transpose(0, 1))
    return res


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                               max_context_len: int | None = None, kv_scale: float = 1.0,
                               v_proj: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: gather each sequence's tokens through its block table, mask past its length, softmax in fp32.

    No host sync, so it also serves (slowly) on a GPU; empty contexts give zeros. FP8 caches are multiplied by
    kv_scale after the gather. v_proj: see paged_decode_attention.
    """
    B, Hq, Hkv, Dk, Dv, bs = _check(q, k_cache, v_cache, block_tables, context_lens)
    S = block_tables.shape[1] * bs
    if max_context_len is not None:
        S = min(S, max_context_len)
    pos = torch.arange(S, device=q.device)
    pages = block_tables[:, pos // bs].long()  # (B, S); entries past a sequence's blocks may be anything valid
    k = k_cache[pages, pos % bs].float()  # (B, S, Hkv, Dk)
    v = v_cache[pages, pos % bs].float()  # (B, S, Hkv, Dv)
    if kv_scale != 1.0:
        k, v = k * kv_scale, v * kv_scale
    valid = pos[None, :] < context_lens[:, None]  # (B, S)
    v = v.masked_fill(~valid[:, :, None, None], 0)  # stale slots may hold anything, NaN included
    G = Hq // Hkv
    qg = q.float().reshape(B, Hkv, G, Dk)
    scores = torch.einsum("bhgd,bshd->bhgs", qg, k) * scale  # (B, Hkv, G, S)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = scores.softmax(-1).nan_to_num(0.0)  # an empty context softmaxes all -inf to NaN: make it zeros
    out = torch.einsum("bhgs,bshd->bhgd", p, v)  # (B, Hkv, G, Dv)
    out = out.reshape(B, Hq, Dv).to(q.dtype)
    _check_proj(v_proj, Hq, Dv, q)
    return out if v_proj is None else project_heads(out, v_proj)


if HAS_TRITON:

    # Batch-dependent sizes are not specialised on, so one compiled kernel serves every batch and length.
    @triton.jit(do_not_specialize=["num_splits", "split_len", "stride_btb"])
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
        qk_scale,  # softmax scale * kv_scale * log2(e): the softmax runs in base 2
        v_scale,   # kv_scale: V's dequantization, applied to the output
        stride_qb, stride_qh, stride_qd,
        stride_kn, stride_kt, stride_kh, stride_kd,
        stride_vn, stride_vt, stride_vh, stride_vd,
        stride_btb, stride_btn,
        stride_ob, stride_oh, stride_od,
        num_splits, split_len, Hq,
        GROUP: tl.constexpr,       # query heads per kv head
        BLOCK_H: tl.constexpr,     # query heads per program, a power of two >= 16 (tl.dot needs M >= 16)
        HEAD_BLOCKS: tl.constexpr,  # programs per kv head along the heads: cdiv(GROUP, BLOCK_H)
        PAGE: tl.constexpr,        # tokens per cache block
        DK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,  # DK = D1 (power of two) + rest, padded to D2 (0: none)
        DV: tl.constexpr, BLOCK_DV: tl.constexpr,
        V_IS_K: tl.constexpr,      # v is the first DV == D1 columns of k: reuse the K tile instead of loading again
        BLOCK_N: tl.constexpr,     # tokens per tile
        ONE_SPLIT: tl.constexpr,   # a single split: normalise and write the output directly
        KV_FP8: tl.constexpr,      # e4m3 cache: convert each tile to q's dtype after the load
    ):
        b = tl.program_id(0)
        g = tl.program_id(1) // HEAD_BLOCKS  # kv head
        hb = tl.program_id(1) % HEAD_BLOCKS
        s = tl.program_id(2)
        ctx = tl.load(lens_ptr + b)
        start = s * split_len
        h_in_group = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        heads = g * GROUP + h_in_group
        h_mask = h_in_group < GROUP
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_mask = offs_dv < DV
        if start >= ctx:
            if ONE_SPLIT:  # empty context: the output is zeros
                tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od,
                         tl.zeros((BLOCK_H, BLOCK_DV), tl.float32).to(out_ptr.dtype.element_ty),
                         mask=h_mask[:, None] & dv_mask[None, :])
            return  # splits past the end write nothing; the merge kernel skips them
        end = tl.minimum(start + split_len, ctx)

        offs_d1 = tl.arange(0, D1)
        q_base = q_ptr + b * stride_qb + heads[:, None] * stride_qh
        q1 = tl.load(q_base + offs_d1[None, :] * stride_qd, mask=h_mask[:, None], other=0.0)  # (BLOCK_H, D1)
        if D2 > 0:
            offs_d2 = D1 + tl.arange(0, D2)
            q2 = tl.load(q_base + offs_d2[None, :] * stride_qd, mask=h_mask[:, None] & (offs_d2 < DK)[None, :],
                         other=0.0)  # (BLOCK_H, D2)

        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # running max (base-2 logits)
        l_i = tl.zeros((BLOCK_H,), tl.float32)                 # running sum of exp2
        acc = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)
        bt_row = bt_ptr + b * stride_btb
        for n0 in range(start, end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            t_mask = t < end
            page = tl.load(bt_row + (t // PAGE) * stride_btn, mask=t_mask, other=0).to(tl.int64)
            k_row = k_ptr + page * stride_kn + (t % PAGE) * stride_kt + g * stride_kh  # (BLOCK_N,) row starts
            k1 = tl.load(k_row[:, None] + offs_d1[None, :] * stride_kd, mask=t_mask[:, None], other=0.0)
            if KV_FP8:
                k1 = k1.to(q1.dtype)
            scores = tl.dot(q1, tl.trans(k1))  # (BLOCK_H, BLOCK_N) fp32
            if D2 > 0:
                k2 = tl.load(k_row[:, None] + offs_d2[None, :] * stride_kd,
                             mask=t_mask[:, None] & (offs_d2 < DK)[None, :], other=0.0)
                if KV_FP8:
                    k2 = k2.to(q2.dtype)
                scores = tl.dot(q2, tl.trans(k2), scores)
            # Every tile starts before `end`, so each row has a finite max after the first tile: no NaN.
            scores = tl.where(t_mask[None, :], scores * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_IS_K:
                v = k1
            else:
                v_row = v_ptr + page * stride_vn + (t % PAGE) * stride_vt + g * stride_vh
                v = tl.load(v_row[:, None] + offs_dv[None, :] * stride_vd, mask=t_mask[:, None] & dv_mask[None, :],
                            other=0.0)  # (BLOCK_N, BLOCK_DV)
                if KV_FP8:
                    v = v.to(q1.dtype)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new

        o_mask = h_mask[:, None] & dv_mask[None, :]
        acc = acc * v_scale
        if ONE_SPLIT:
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :] * stride_od,
                     (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=o_mask)
        else:
            # part_o (B, Hq, num_splits, DV) fp32, normalised within the split; part_lse (B, Hq, num_splits) base 2
            row = (b * Hq + heads) * num_splits + s  # (BLOCK_H,)
            tl.store(part_o_ptr + row[:, None] * DV + offs_dv[None, :], acc / l_i[:, None], mask=o_mask)
            tl.store(part_lse_ptr + row, m_i + tl.math.log2(l_i), mask=h_mask)

    @triton.jit(do_not_specialize=["num_splits", "split_len"])
    def _paged_decode_merge_kernel(part_o_ptr, part_lse_ptr, lens_ptr, out_ptr, num_splits, split_len, Hq,
                                   stride_ob, stride_oh, stride_od,
                                   DV: tl.constexpr, BLOCK_DV: tl.constexpr, S_P2: tl.constexpr):
        # out[b, h] = sum_s 2^(lse_s - M) * o_s / sum_s 2^(lse_s - M) over the splits that held tokens.
        b = tl.program_id(0)
        h = tl.program_id(1)
        ctx = tl.load(lens_ptr + b)
        used = tl.minimum(num_splits, (ctx + split_len - 1) // split_len)
        base = (b * Hq + h) * num_splits
        offs_s = tl.arange(0, S_P2)
        s_mask = offs_s < used
        lse = tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        denom = tl.sum(tl.where(s_mask, tl.math.exp2(lse - m), 0.0), 0)
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_mask = offs_dv < DV
        acc = tl.zeros((BLOCK_DV,), tl.float32)
        for i in range(0, used):
            w = tl.math.exp2(tl.load(part_lse_ptr + base + i) - m)
            acc += w * tl.load(part_o_ptr + (base + i) * DV + offs_dv, mask=dv_mask, other=0.0)
        out = tl.where(denom > 0, acc / denom, 0.0)  # an empty context has no splits: zeros
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_dv * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=dv_mask)

    @triton.jit(do_not_specialize=["num_splits", "split_len"])
    def _merge_project_kernel(part_o_ptr, part_lse_ptr, lens_ptr, w_ptr, out_ptr, num_splits, split_len, Hq,
                              stride_wh, stride_wp, stride_wd, stride_ob, stride_oh, stride_op,
                              DV: tl.constexpr, DP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_S: tl.constexpr):
        # out[b, h, p] = sum_s c_s (o_s . w[h, p]) / sum_s c_s with c_s = 2^(lse_s - max lse), for this program's
        # slice of p: the merge is linear, so each tile of BLOCK_S splits' partials goes through the weight slice
        # directly. The channel loop is unrolled so that its loads are all in flight at once: this kernel is
        # latency-bound (one row, 16 heads, a few microseconds).
        h = tl.program_id(0)
        offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        b = tl.program_id(2)
        p_mask = offs_p < DP
        w_rows = w_ptr + h * stride_wh + offs_p[:, None] * stride_wp
        ctx = tl.load(lens_ptr + b)
        used = tl.minimum(num_splits, (ctx + split_len - 1) // split_len)
        base = (b * Hq + h) * num_splits
        m = float("-inf")
        for s0 in range(0, used, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            m = tl.maximum(m, tl.max(tl.load(part_lse_ptr + base + offs_s, mask=offs_s < used, other=float("-inf")), 0))
        acc = tl.zeros((BLOCK_P,), tl.float32)
        denom = 0.0
        for s0 in range(0, used, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_mask = offs_s < used
            c = tl.where(s_mask, tl.math.exp2(tl.load(part_lse_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
                                              - m), 0.0)
            denom += tl.sum(c, 0)
            for d0 in tl.static_range(0, DV, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < DV
                part = tl.load(part_o_ptr + (base + offs_s)[:, None] * DV + offs_d[None, :],
                               mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
                w = tl.load(w_rows + offs_d[None, :] * stride_wd, mask=p_mask[:, None] & d_mask[None, :], other=0.0)
                acc += tl.sum(w.to(tl.float32) * tl.sum(c[:, None] * part, 0)[None, :], 1)
        acc = acc / tl.maximum(denom, 1e-30)  # an empty context has no splits: zeros
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_p * stride_op, acc.to(out_ptr.dtype.element_ty),
                 mask=p_mask)


# By kind of head layout; tuned by bench/bench_kernels.py:
#   BLOCK_N tokens per tile; BLOCK_H most query heads per program;
#   waves: split the context until there are about waves * (multiprocessors) programs, but
#   MIN_SPLIT: never below this many tokens per split (each split loads q and writes a (heads, Dv) fp32 partial:
#              for MLA that partial weighs as much as ~30 cached tokens, so splits must stay long), except for a
#              batch too small to fill 1/32 of the GPU: that one is latency-bound and splits down to single tiles;
#   num_warps, num_stages.
ATTN_CONFIGS = {
    "mla": dict(BLOCK_N=32, BLOCK_H=16, waves=4, MIN_SPLIT=128, num_warps=4, num_stages=2),  # 1 kv head, 576 / 512
    "gqa": dict(BLOCK_N=64, BLOCK_H=16, waves=2, MIN_SPLIT=64, num_warps=4, num_stages=2),  # Dk = Dv <= 256
}
# The merge-and-project kernel (v_proj), tuned by bench/tune_mla_decode.py: batches up to max_batch (every row's
# programs read the whole W_UV, from L2 after the first: at batch 4 it ties with the merge and one bmm over the
# batch, past that it loses); BLOCK_P outputs per program (V2-Lite's v_head_dim 128 in slices of 16 is 128
# programs a row for 16 heads), BLOCK_D latent channels and BLOCK_S splits per tile. V2-Lite, H100, batch 1 at 384
# cached tokens: attention with the merge and W_UV 10.5 us, against 12.2 unfused.
PROJ_CONFIG = dict(max_batch=2, BLOCK_P=16, BLOCK_D=256, BLOCK_S=16, num_warps=4)
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_plan(programs: int, max_ctx: int, block_n: int, target: int, min_split: int, sm_count: int
               ) -> tuple[int, int]:
    """(num_splits, split_len): about `target` programs in all, from shapes and a host-side length bound only."""
    if programs * 32 <= sm_count:
        min_split = block_n
    tiles = max(1, triton.cdiv(max_ctx, block_n))
    want = triton.cdiv(target, programs)
    splits = max(1, min(want, tiles // max(1, min_split // block_n)))
    split_len = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(max(max_ctx, 1), split_len), split_len


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, *, max_context_len: int | None = None,
                           config: dict | None = None, kv_scale: float = 1.0,
                           v_proj: torch.Tensor | None = None, proj_config: dict | None = None) -> torch.Tensor:
    """q (B, Hq, Dk), k_cache (num_blocks, block_size, Hkv, Dk), v_cache (num_blocks, block_size, Hkv, Dv) (any
    strides: it may be a view of k_cache), block_tables (B, max_blocks) int32, context_lens (B,) int32 -> (B, Hq, Dv).

    Each sequence attends to its first context_lens[b] cached tokens (zeros for an empty one). `max_context_len`, an
    optional host-side bound on context_lens, sizes the split-K grid (default: what the block tables can hold);
    context lengths are not range-checked on the device. On CUDA with Triton and bf16/fp16 this runs the Triton
    kernels with no host sync; otherwise `paged_decode_attention_ref`. `config` overrides ATTN_CONFIGS (for tuning).
    The caches may be float8_e4m3fn (with q bf16/fp16/fp32) holding K/kv_scale and V/kv_scale.

    v_proj (Hq, Dp, Dv), any strides: return each head's output times its matrix, out[b, h] @ v_proj[h].T, (B, Hq,
    Dp): absorbed MLA's W_UV. `proj_config` overrides PROJ_CONFIG.
    """
    B, Hq, Hkv, Dk, Dv, bs = _check(q, k_cache, v_cache, block_tables, context_lens)
    _check_proj(v_proj, Hq, Dv, q)
    if not (HAS_TRITON and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale, max_context_len,
                                          kv_scale, v_proj)
    if Dk < 16 or Dv < 16:
        raise ValueError(f"head dims must be at least 16 for the tensor-core path, got Dk={Dk}, Dv={Dv}")
    max_ctx = block_tables.shape[1] * bs
    if max_context_len is not None:
        max_ctx = min(max_ctx, max_context_len)
    cfg = config or ATTN_CONFIGS["mla" if Hkv == 1 and Dk > 256 else "gqa"]
    return _paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, max_ctx, cfg,
                                _sm_count(q.device), kv_scale, v_proj, proj_config or PROJ_CONFIG)


def _paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, max_ctx, cfg, sm_count,
                         kv_scale=1.0, v_proj=None, proj=PROJ_CONFIG):
    (B, Hq, Dk), (_, bs, Hkv, _), Dv = q.shape, k_cache.shape, v_cache.shape[3]
    if B == 0:
        return q.new_empty(B, Hq, Dv if v_proj is None else v_proj.shape[1])
    fuse_proj = v_proj is not None and B <= proj["max_batch"]
    group = Hq // Hkv
    block_n = cfg["BLOCK_N"]
    block_h = min(cfg["BLOCK_H"], max(16, triton.next_power_of_2(group)))
    head_blocks = triton.cdiv(group, block_h)
    num_splits, split_len = split_plan(B * Hkv * head_blocks, max_ctx, block_n, cfg["waves"] * sm_count,
                                       cfg["MIN_SPLIT"], sm_count)
    d1 = 1 << (Dk.bit_length() - 1)  # largest power of two <= Dk
    d2 = 0 if d1 == Dk else max(16, triton.next_power_of_2(Dk - d1))
    # MLA: V is the leading Dv columns of the very same rows as K, so the K tile already holds it.
    v_is_k = (v_cache.data_ptr() == k_cache.data_ptr() and v_cache.stride() == k_cache.stride() and Dv == d1)
    one = num_splits == 1 and not fuse_proj  # the merge-and-project kernel reads partials, even a single one
    out = q.new_empty(B, Hq, Dv) if not fuse_proj else q  # (unused by the attention kernel when fused)
    if one:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty(B, Hq, num_splits, Dv, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    block_dv = triton.next_power_of_2(Dv)
    _paged_decode_kernel[(B, Hkv * head_blocks, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_o, part_lse,
        scale * kv_scale * math.log2(math.e), kv_scale,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
        num_splits, split_len, Hq,
        GROUP=group, BLOCK_H=block_h, HEAD_BLOCKS=head_blocks, PAGE=bs, DK=Dk, D1=d1, D2=d2,
        DV=Dv, BLOCK_DV=block_dv, V_IS_K=v_is_k, BLOCK_N=block_n, ONE_SPLIT=one,
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if fuse_proj:
        Dp = v_proj.shape[1]
        res = q.new_empty(B, Hq, Dp)
        _merge_project_kernel[(Hq, triton.cdiv(Dp, proj["BLOCK_P"]), B)](
            part_o, part_lse, context_lens, v_proj, res, num_splits, split_len, Hq, *v_proj.stride(),
            *res.stride(), DV=Dv, DP=Dp, BLOCK_P=proj["BLOCK_P"], BLOCK_D=min(proj["BLOCK_D"], block_dv),
            BLOCK_S=proj["BLOCK_S"], num_warps=proj["num_warps"])
        return res
    if not one:
        _paged_decode_merge_kernel[(B, Hq)](
            part_o, part_lse, context_lens, out, num_splits, split_len, Hq, *out.stride(),
            DV=Dv, BLOCK_DV=block_dv, S_P2=triton.next_power_of_2(num_splits), num_warps=4)
    return out if v_proj is None else project_heads(out, v_proj)
