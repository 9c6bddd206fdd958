"""Fused mixture-of-experts feed-forward: routed SwiGLU experts in two grouped GEMMs.

    y[t] = sum_j w[t, j] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),   e = topk_ids[t, j]

with gate_up[e] = cat([W_gate (I, H), W_up (I, H)]) and down[e] (H, I), the F.linear convention (y = x @ W^T).

CUDA path (bf16/fp16, Triton), no host sync anywhere, so a CUDA graph can capture it:
  small batch (T * k up to a few dozen pairs): two GEMV-style kernels, no sorting. Program (pair, n-tile) streams
      its expert's gate and up rows once and writes silu(g) * u; program (pair, n-tile) streams its expert's down
      rows and stores its weighted fp32 result, and the last of a token's pairs to finish (an arrival counter,
      mixr.kernels.arrivals) sums them, so the sum over k needs no kernel of its own.
  otherwise: (a) align: the T*k (token, expert) pairs are grouped by expert on the GPU into a padded list of
      fixed worst-case length T*k + E*(BLOCK_M-1), each expert's run padded to a multiple of BLOCK_M, with the
      expert of every BLOCK_M-row block and the number of used blocks as device tensors; (b) grouped GEMM for
      gate and up together with silu(g) * u in the epilogue -> act (T*k, I); (c) grouped GEMM for down with the
      routing weight multiplied in the epilogue -> (T*k, H); (d) a reshape + sum over k.
Everything else (CPU, fp32, no Triton) runs `fused_moe_ref`.

A pair with expert id -1 is skipped by every path (its weight is ignored): dynamic routing drops experts that
way, and expert offload runs the resident experts' pairs only. Such pairs cost no weight reads.

`fused_moe_quant` is the same computation on packed int4/int8 experts (the format of mixr.kernels.quant_gemm):
the same two paths, with the weight tiles dequantized inside the K loops by quant_gemm's jit helpers (int8's
small-batch GEMVs on the tensor cores, the token padded to 16 rows: see moe_quant_config).
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

HAS_TRITON = triton is not None

from mixr.kernels.arrivals import arrival_counters  # noqa: E402
from mixr.kernels.quant_gemm import check_packed, dequantize, dequantize_triton, quant_linear  # noqa: E402

if HAS_TRITON:
    from mixr.kernels.arrivals import arrive_last
    from mixr.kernels.quant_gemm import qgemv_rows, qmm_loop  # jit helpers of the quantized experts

# Tile configs by (H, I) of the expert, then by batch: the first entry whose max_T >= T is used.
#   gemv: small-batch path. UP_N/UP_K tile the gate+up GEMV, DOWN_N/DOWN_K the down GEMV; FUSE_K sums over k
#         inside the down kernel (one program per token) instead of one program per pair, the last to finish
#         summing.
#   gemm: grouped path. BLOCK_M is shared by both GEMMs (it sets the alignment); "up" and "down" give
#         BLOCK_N, BLOCK_K, GROUP_M (programs along M launched together, so they share weight tiles in L2),
#         num_warps, num_stages for each GEMM.
# Tuned on one H100 (bench/bench_kernels.py sweeps candidates; bench/tune_quant_moe.py --formats bf16 the small-batch
# tiles with the shared expert inside): DeepSeek-V2-Lite (2048, 1408), Qwen3-30B-A3B (2048, 768).
def _gemv(up_n, up_k, down_n, down_k, fuse_k=True, warps=4):
    return dict(path="gemv", UP_N=up_n, UP_K=up_k, DOWN_N=down_n, DOWN_K=down_k, FUSE_K=fuse_k, num_warps=warps)


def _gemm(bm, up, down):
    keys = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    return dict(path="gemm", BLOCK_M=bm, up=dict(zip(keys, up)), down=dict(zip(keys, down)))


MOE_CONFIGS: dict[tuple[int, int], list[tuple[int, dict]]] = {
    (2048, 1408): [
        (1, _gemv(4, 128, 8, 128, fuse_k=False, warps=1)),  # with 2 shared slices: 52.8 us (56.9 at 4 warps)
        (8, _gemv(8, 256, 32, 128, fuse_k=False)),
        (32, _gemm(16, (64, 256, 1, 4, 3), (64, 128, 1, 4, 4))),
        (256, _gemm(32, (128, 128, 1, 4, 3), (128, 128, 1, 4, 3))),
        (1 << 30, _gemm(128, (128, 64, 8, 8, 4), (256, 64, 8, 8, 3))),
    ],
    (2048, 768): [
        (8, _gemv(4, 256, 16, 256, fuse_k=False)),
        (32, _gemm(16, (64, 256, 1, 4, 3), (64, 128, 1, 4, 4))),
        (256, _gemm(32, (128, 128, 1, 4, 3), (128, 128, 1, 4, 3))),
        (1 << 30, _gemm(128, (128, 64, 8, 8, 4), (128, 64, 8, 8, 3))),
    ],
}
_DEFAULT_CONFIGS = [
    (8, _gemv(4, 256, 16, 128, fuse_k=False)),
    (32, _gemm(16, (64, 256, 1, 4, 3), (64, 128, 1, 4, 4))),
    (512, _gemm(32, (128, 128, 1, 4, 3), (128, 128, 1, 4, 3))),
    (1 << 30, _gemm(128, (128, 64, 8, 8, 4), (128, 64, 8, 8, 3))),
]


def moe_config(T: int, H: int, I: int) -> dict:
    for max_t, cfg in MOE_CONFIGS.get((H, I), _DEFAULT_CONFIGS):
        if T <= max_t:
            return cfg
    raise AssertionError("the last config entry covers every T")


def _check(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
           topk_weights: torch.Tensor) -> tuple[int, int, int, int, int]:
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise ValueError(f"expected x (T, H), gate_up (E, 2I, H), down (E, H, I); got {tuple(x.shape)}, "
                         f"{tuple(gate_up.shape)}, {tuple(down.shape)}")
    T, H = x.shape
    E, two_i, H2 = gate_up.shape
    I = two_i // 2
    if H2 != H or two_i % 2 or tuple(down.shape) != (E, H, I):
        raise ValueError(f"shape mismatch: x (T={T}, H={H}), gate_up {tuple(gate_up.shape)} must be (E, 2I, H), "
                         f"down {tuple(down.shape)} must be (E, H, I) = ({E}, {H}, {I})")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be (T={T}, k)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    if not x.is_floating_point() or gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise TypeError(f"x, gate_up and down must share one floating dtype; got {x.dtype}, {gate_up.dtype}, "
                        f"{down.dtype}")
    devices = {t.device for t in (x, gate_up, down, topk_ids, topk_weights)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return T, H, E, I, topk_ids.shape[1]


def fused_moe_ref(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch fused_moe: a loop over the experts that were chosen (one host sync for their counts).
    Pairs with id -1 are skipped."""
    T, H, E, I, k = _check(x, gate_up, down, topk_ids, topk_weights)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    flat = topk_ids.flatten().long()
    order = flat.argsort(stable=True)  # pair indices t*k + j grouped by expert, the skipped (-1) ones first
    if flat.numel() and flat.min() < -1:
        raise ValueError(f"topk_ids holds {flat.min().item()}; ids are 0..{E - 1}, or -1 for a skipped pair")
    counts = torch.bincount(flat + 1, minlength=E + 1).tolist()  # counts[0]: skipped pairs
    if len(counts) > E + 1:
        raise ValueError(f"topk_ids holds expert {len(counts) - 2}, but there are only {E} experts")
    w = topk_weights.flatten()
    start = counts.pop(0)
    # unbind, not gate_up[e]: indexing in the loop makes autograd build a zero gradient the size of the whole stack
    # for every expert (a V2-Lite layer at 4096 tokens, H100: 214 ms fwd+bwd vs 56 ms); unbind's backward stacks once.
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tok = pairs // k
        gate, up = F.linear(x[tok], gate_ups[e]).float().chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(x.dtype)  # the kernels round the activation to x's dtype too
        out.index_add_(0, tok, F.linear(act, downs[e]).float() * w[pairs, None])
    return out.to(x.dtype)


if HAS_TRITON:

    # ---------------------------------------------------------------- align: group (token, expert) pairs by expert
    # Sizes that change with the batch are not specialised on, so one compiled kernel serves every T.
    @triton.jit(do_not_specialize=["n"])
    def _align_count_kernel(ids_ptr, counts_ptr, n, CHUNK: tl.constexpr, E_P2: tl.constexpr):
        # counts[c, e] = number of pairs in chunk c that chose expert e.  counts: (num_chunks, E_P2) int32
        c = tl.program_id(0)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        hit = ids[:, None] == tl.arange(0, E_P2)[None, :]  # (CHUNK, E_P2) one-hot
        tl.store(counts_ptr + c * E_P2 + tl.arange(0, E_P2), tl.sum(hit.to(tl.int32), 0))

    @triton.jit(do_not_specialize=["n", "num_chunks", "max_padded", "max_blocks"])
    def _align_offsets_kernel(counts_ptr, offsets_ptr, sorted_ids_ptr, expert_ids_ptr, num_blocks_ptr,
                              n, num_chunks, num_experts, max_padded, max_blocks,
                              BLOCK_M: tl.constexpr, E_P2: tl.constexpr, ROWS: tl.constexpr, FILL: tl.constexpr):
        # ROWS: chunks per step of the scans; FILL: entries per step of the fills. Both keep tiles near 4K elements.
        # One program: turns the per-chunk counts into where each chunk's pairs of each expert go.
        cols = tl.arange(0, E_P2)
        total = tl.zeros((E_P2,), tl.int32)
        for r0 in range(0, num_chunks, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            t = tl.load(counts_ptr + rows[:, None] * E_P2 + cols[None, :], mask=rows[:, None] < num_chunks, other=0)
            total += tl.sum(t, 0)
        padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # each expert's run rounded up to whole blocks
        ends = tl.cumsum(padded, 0)
        starts = ends - padded
        tl.store(num_blocks_ptr, tl.sum(padded, 0) // BLOCK_M)
        # Chunk c's pairs of expert e start after those of chunks < c: an exclusive scan down the chunk axis.
        carry = starts
        for r0 in range(0, num_chunks, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            rmask = rows[:, None] < num_chunks
            t = tl.load(counts_ptr + rows[:, None] * E_P2 + cols[None, :], mask=rmask, other=0)
            tl.store(offsets_ptr + rows[:, None] * E_P2 + cols[None, :], carry[None, :] + tl.cumsum(t, 0) - t,
                     mask=rmask)
            carry += tl.sum(t, 0)
        # Block b holds rows [b*BLOCK_M, (b+1)*BLOCK_M): its expert is the number of runs that end at or before it.
        # Blocks past the used ones get a clamped id; the GEMMs never read them (they stop at num_blocks).
        for b0 in range(0, max_blocks, ROWS):
            b = b0 + tl.arange(0, ROWS)
            e = tl.sum((ends[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), 1)
            tl.store(expert_ids_ptr + b, tl.minimum(e, num_experts - 1), mask=b < max_blocks)
        # Padding rows hold the sentinel n (one past the last pair); the scatter kernel overwrites the real rows.
        for i0 in range(0, max_padded, FILL):
            i = i0 + tl.arange(0, FILL)
            tl.store(sorted_ids_ptr + i, tl.full((FILL,), 0, tl.int32) + n, mask=i < max_padded)

    @triton.jit(do_not_specialize=["n"])
    def _align_scatter_kernel(ids_ptr, offsets_ptr, sorted_ids_ptr, n, CHUNK: tl.constexpr, E_P2: tl.constexpr):
        c = tl.program_id(0)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
        hit = ids[:, None] == tl.arange(0, E_P2)[None, :]  # (CHUNK, E_P2)
        rank = tl.cumsum(hit.to(tl.int32), 0) - 1  # rank of each pair among this chunk's pairs of its expert
        base = tl.load(offsets_ptr + c * E_P2 + tl.arange(0, E_P2))
        pos = tl.sum(tl.where(hit, rank + base[None, :], 0), 1)  # (CHUNK,)
        tl.store(sorted_ids_ptr + pos, offs.to(tl.int32), mask=(offs < n) & (ids >= 0))  # -1 pairs go nowhere

    # ---------------------------------------------------------------- grouped GEMM over the aligned pairs
    @triton.jit(do_not_specialize=["n_pairs", "max_blocks_m", "a_row_div"])
    def _moe_gemm_kernel(
        a_ptr, b_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, num_blocks_ptr,
        N, K, n_pairs, max_blocks_m,
        a_row_div,  # top_k when A's rows are tokens (gate+up), 1 when they are pairs (down)
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
        GATE_UP: tl.constexpr,    # B holds [gate; up] (2N rows): write silu(A @ gate^T) * (A @ up^T)
        MUL_WEIGHT: tl.constexpr,  # scale row (pair) p by topk_weights.flat[p]
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # C[p, :] = A[p // a_row_div, :] @ B[e(p)]^T for the pairs p of one BLOCK_M block (all of one expert e).
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # GROUP_M blocks along M are launched for each N tile before moving on, so consecutive programs reuse
        # the expert's weight tile from L2 (most consecutive blocks belong to the same expert).
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(max_blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m
        if pid_m >= tl.load(num_blocks_ptr):
            return  # the grid is sized for the worst case; blocks past the used ones do nothing

        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # (BLOCK_M,), sentinel n_pairs
        row_mask = pairs < n_pairs
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        # Wrap the N index instead of masking the weight loads (keeps them unmasked and vectorised);
        # the wrapped columns are dropped at the store.
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + (pairs // a_row_div).to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + e * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk  # (BK, BN)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
                b = tl.load(b_ptrs)
            else:
                k_mask = offs_k < K - kk * BLOCK_K
                a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
            if GATE_UP:
                if EVEN_K:
                    b_up = tl.load(b_ptrs + N * stride_bn)
                else:
                    b_up = tl.load(b_ptrs + N * stride_bn, mask=k_mask[:, None], other=0.0)
                acc_up = tl.dot(a, b_up, acc_up)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        if GATE_UP:
            acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up in fp32
        if MUL_WEIGHT:
            w = tl.load(topk_w_ptr + pairs, mask=row_mask, other=0.0)
            acc = acc * w[:, None]
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        c_ptrs = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < N)[None, :])

    # ---------------------------------------------------------------- small batch: GEMV per pair / per token
    @triton.jit(do_not_specialize=["top_k", "n_shared"])
    def _moe_gemv_gate_up_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, sg_ptr, su_ptr, H, I, top_k, n_shared,
                                 stride_xm, stride_we, stride_wn, stride_wk, stride_sn,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        # act[p, n] = silu(W_gate[e] x[t]) * (W_up[e] x[t]) for pair p = t*(top_k + n_shared) + j, n in this
        # program's tile. Pairs j >= top_k are the shared expert's I-wide slices j - top_k of its gate and up
        # weights (sg, su: (n_shared * I, H)), so the shared expert runs in the same launch as the routed ones.
        p = tl.program_id(0)
        pid_n = tl.program_id(1)
        t = p // (top_k + n_shared)
        j = p % (top_k + n_shared)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Loads wrap the row index instead of masking it, and the main loop runs over whole BLOCK_K tiles with no K
        # mask: a mask that varies along K turns the 16-byte vector loads into 2-byte ones. A masked tail follows
        # when BLOCK_K does not divide H.
        rows = offs_n % I
        offs_k = tl.arange(0, BLOCK_K)
        if j < top_k:
            e = tl.load(ids_ptr + t * top_k + j).to(tl.int64)
            g_ptrs = w_ptr + e * stride_we + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk  # (BN, BK)
            u_ptrs = g_ptrs + I * stride_wn
        else:
            e = (j * 0).to(tl.int64)
            srows = (j - top_k).to(tl.int64) * I + rows
            g_ptrs = sg_ptr + srows[:, None] * stride_sn + offs_k[None, :] * stride_wk  # stride_wk: 1 for both
            u_ptrs = su_ptr + srows[:, None] * stride_sn + offs_k[None, :] * stride_wk
        if e < 0:
            return  # a skipped pair: its act row is never read
        x_ptrs = x_ptr + t * stride_xm + offs_k
        # Reduce each tile right away: 2-D accumulators would hold BLOCK_N*BLOCK_K/threads more registers per
        # thread and cost occupancy, which this memory-bound loop needs for loads in flight.
        g = tl.zeros((BLOCK_N,), dtype=tl.float32)
        u = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, H - H % BLOCK_K, BLOCK_K):
            xk = tl.load(x_ptrs).to(tl.float32)
            g += tl.sum(tl.load(g_ptrs).to(tl.float32) * xk[None, :], 1)
            u += tl.sum(tl.load(u_ptrs).to(tl.float32) * xk[None, :], 1)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        if not EVEN_K:
            k_mask = offs_k < H % BLOCK_K
            xk = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            g += tl.sum(tl.load(g_ptrs, mask=k_mask[None, :], other=0.0).to(tl.float32) * xk[None, :], 1)
            u += tl.sum(tl.load(u_ptrs, mask=k_mask[None, :], other=0.0).to(tl.float32) * xk[None, :], 1)
        tl.store(act_ptr + p * I + offs_n, (g * tl.sigmoid(g) * u).to(act_ptr.dtype.element_ty), mask=offs_n < I)

    @triton.jit
    def sum_pairs_last(acc, part_ptr, cnt_ptr, out_ptr, r, kk, offs_n, H, stride_om):
        # Program (pair r, n-tile) of a grid over (T * kk pairs, n-tiles): store this pair's fp32 part, count it in on
        # its (token, n-tile) counter, and if it arrives last, sum the token's kk parts in pair order (the same
        # rounding whichever program is last) into out[t].
        t = r // kk
        n_mask = offs_n < H
        tl.store(part_ptr + r.to(tl.int64) * H + offs_n, acc, mask=n_mask)
        if arrive_last(cnt_ptr + t * tl.num_programs(1) + tl.program_id(1), kk):
            total = tl.zeros(acc.shape, tl.float32)
            for j in range(kk):  # .cg: from L2, never a stale L1 line (other programs wrote these parts)
                total += tl.load(part_ptr + (t * kk + j).to(tl.int64) * H + offs_n, mask=n_mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + t.to(tl.int64) * stride_om + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_mask)

    @triton.jit(do_not_specialize=["top_k", "n_shared"])
    def _moe_gemv_down_kernel(act_ptr, w_ptr, ids_ptr, topk_w_ptr, out_ptr, sd_ptr, part_ptr, cnt_ptr,
                              H, I, top_k, n_shared, stride_we, stride_wn, stride_wk, stride_sn, stride_om,
                              PER_TOKEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              EVEN_K: tl.constexpr):
        # out[t, n] = sum over token t's pairs p of w[p] * down[e(p)][n, :] . act[p, :], pairs laid out as in the
        # gate_up kernel (the shared slices j >= top_k read columns of sd (H, n_shared * I), weight 1).
        # PER_TOKEN: program r is token r and the sum over its pairs stays in registers; otherwise program r is pair
        # r (more programs, for more loads in flight at tiny T) and the last of a token's pairs to finish sums them.
        r = tl.program_id(0)
        pid_n = tl.program_id(1)
        kk = top_k + n_shared
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n % H  # wrapped, not masked (see the gate_up kernel)
        offs_k = tl.arange(0, BLOCK_K)
        out = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for jj in range(kk if PER_TOKEN else 1):
            p = r * kk + jj if PER_TOKEN else r
            t = p // kk
            j = p % kk
            if j < top_k:
                e = tl.load(ids_ptr + t * top_k + j).to(tl.int64)
                weight = tl.load(topk_w_ptr + t * top_k + j)
                w_ptrs = w_ptr + e * stride_we + rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
            else:
                e = (j * 0).to(tl.int64)
                weight = (j * 0).to(tl.float32) + 1.0
                cols = (j - top_k).to(tl.int64) * I + offs_k
                w_ptrs = sd_ptr + rows[:, None] * stride_sn + cols[None, :] * stride_wk  # stride_wk: 1 for both
            if e >= 0:  # skipped pairs (-1) add nothing and read no weights
                a_ptrs = act_ptr + p * I + offs_k
                acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for k0 in range(0, I - I % BLOCK_K, BLOCK_K):  # whole tiles unmasked, then the tail (as above)
                    a = tl.load(a_ptrs).to(tl.float32)
                    acc += tl.sum(tl.load(w_ptrs).to(tl.float32) * a[None, :], 1)
                    a_ptrs += BLOCK_K
                    w_ptrs += BLOCK_K * stride_wk
                if not EVEN_K:
                    k_mask = offs_k < I % BLOCK_K
                    a = tl.load(a_ptrs, mask=k_mask, other=0.0).to(tl.float32)
                    acc += tl.sum(tl.load(w_ptrs, mask=k_mask[None, :], other=0.0).to(tl.float32) * a[None, :], 1)
                out += weight * acc
        if PER_TOKEN:
            tl.store(out_ptr + r * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < H)
        else:
            sum_pairs_last(out, part_ptr, cnt_ptr, out_ptr, r, kk, offs_n, H, stride_om)

    @triton.jit(do_not_specialize=["top_k"])
    def _moe_sum_kernel(y_ptr, ids_ptr, out_ptr, H, top_k, BLOCK_N: tl.constexpr):
        # out[t] = sum over j of y[t*top_k + j] where ids[t, j] >= 0: the grouped GEMM never writes the rows of
        # skipped pairs, so they must not be read (y is not zero-filled: that would cost a pass over it).
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for j in range(top_k):
            p = t * top_k + j
            if tl.load(ids_ptr + p) >= 0:
                acc += tl.load(y_ptr + p.to(tl.int64) * H + offs, mask=offs < H, other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * H + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < H)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the T*k pairs by expert on the GPU, each expert's run padded to whole BLOCK_M blocks.

    Returns sorted_ids (T*k + E*(block_m-1),) int32: pair index t*k + j, or T*k in padding rows;
    expert_ids (max_blocks,) int32: the expert of each block; num_blocks (1,) int32: blocks in use.
    All sizes come from shapes, so this never waits on the device.
    """
    n = topk_ids.numel()
    ids = topk_ids.reshape(-1)
    max_padded = n + num_experts * (block_m - 1)
    max_blocks = triton.cdiv(max_padded, block_m)
    e_p2 = triton.next_power_of_2(num_experts)
    # Chunk size keeps the (CHUNK, E_P2) one-hot tile near 16K elements.
    chunk = max(16, min(triton.next_power_of_2(n), 16384 // e_p2))
    num_chunks = triton.cdiv(n, chunk)
    dev = topk_ids.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_blocks = torch.empty(1, dtype=torch.int32, device=dev)
    counts = torch.empty(num_chunks, e_p2, dtype=torch.int32, device=dev)
    offsets = torch.empty_like(counts)
    _align_count_kernel[(num_chunks,)](ids, counts, n, CHUNK=chunk, E_P2=e_p2, num_warps=4)
    _align_offsets_kernel[(1,)](counts, offsets, sorted_ids, expert_ids, num_blocks, n, num_chunks, num_experts,
                                max_padded, max_blocks, BLOCK_M=block_m, E_P2=e_p2,
                                ROWS=max(1, 4096 // e_p2), FILL=1024, num_warps=4)
    _align_scatter_kernel[(num_chunks,)](ids, offsets, sorted_ids, n, CHUNK=chunk, E_P2=e_p2, num_warps=4)
    return sorted_ids, expert_ids, num_blocks


def _fused_moe_gemv(x, gate_up, down, ids, weights, T, H, I, k, cfg, shared=None):
    # shared: (gate (S*I, H), up (S*I, H), down (H, S*I)) of a shared expert, run as S more pairs per token.
    sg, su, sd = shared if shared is not None else (gate_up, gate_up, down)  # placeholders, never read
    s = sg.shape[0] // I if shared is not None else 0
    kk = k + s
    act = torch.empty(T * kk, I, dtype=x.dtype, device=x.device)
    _moe_gemv_gate_up_kernel[(T * kk, triton.cdiv(I, cfg["UP_N"]))](
        x, gate_up, ids, act, sg, su, H, I, k, s, x.stride(0), *gate_up.stride(), sg.stride(0),
        BLOCK_N=cfg["UP_N"], BLOCK_K=cfg["UP_K"], EVEN_K=H % cfg["UP_K"] == 0, num_warps=cfg["num_warps"])
    n_tiles = triton.cdiv(H, cfg["DOWN_N"])
    cnt = None if cfg.get("FUSE_K", True) else arrival_counters(x.device, T * n_tiles)
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    part = torch.empty(T * kk, H, dtype=torch.float32, device=x.device) if cnt is not None else out  # fp32 parts
    _moe_gemv_down_kernel[(T if cnt is None else T * kk, n_tiles)](
        act, down, ids, weights, out, sd, part, cnt if cnt is not None else ids, H, I, k, s, *down.stride(),
        sd.stride(0), out.stride(0), PER_TOKEN=cnt is None, BLOCK_N=cfg["DOWN_N"], BLOCK_K=cfg["DOWN_K"],
        EVEN_K=I % cfg["DOWN_K"] == 0, num_warps=cfg["num_warps"])
    return out


def _fused_moe_gemm(x, gate_up, down, ids, weights, T, H, E, I, k, cfg):
    bm = cfg["BLOCK_M"]
    sorted_ids, expert_ids, num_blocks = moe_align(ids, E, bm)
    max_blocks = expert_ids.numel()
    n = T * k
    act = torch.empty(n, I, dtype=x.dtype, device=x.device)
    up = cfg["up"]
    _moe_gemm_kernel[(max_blocks * triton.cdiv(I, up["BLOCK_N"]),)](
        x, gate_up, act, weights, sorted_ids, expert_ids, num_blocks, I, H, n, max_blocks, k,
        x.stride(0), x.stride(1), *gate_up.stride(), act.stride(0), act.stride(1),
        GATE_UP=True, MUL_WEIGHT=False, EVEN_K=H % up["BLOCK_K"] == 0,
        BLOCK_M=bm, BLOCK_N=up["BLOCK_N"], BLOCK_K=up["BLOCK_K"], GROUP_M=up["GROUP_M"],
        num_warps=up["num_warps"], num_stages=up["num_stages"])
    dn = cfg["down"]
    y = torch.empty(n, H, dtype=x.dtype, device=x.device)  # (T*k, H) weighted expert outputs
    _moe_gemm_kernel[(max_blocks * triton.cdiv(H, dn["BLOCK_N"]),)](
        act, down, y, weights, sorted_ids, expert_ids, num_blocks, H, I, n, max_blocks, 1,
        act.stride(0), act.stride(1), *down.stride(), y.stride(0), y.stride(1),
        GATE_UP=False, MUL_WEIGHT=True, EVEN_K=I % dn["BLOCK_K"] == 0,
        BLOCK_M=bm, BLOCK_N=dn["BLOCK_N"], BLOCK_K=dn["BLOCK_K"], GROUP_M=dn["GROUP_M"],
        num_warps=dn["num_warps"], num_stages=dn["num_stages"])
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    _moe_sum_kernel[(T, triton.cdiv(H, 1024))](y, ids, out, H, k, BLOCK_N=1024, num_warps=4)  # fp32, rounds once
    return out


def shared_mlp_ref(x: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The shared expert as GatedMLP computes it: down(silu(gate x) * up x)."""
    gate, up, down = shared
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def _check_shared(shared, H: int, I: int, dtype: torch.dtype) -> bool:
    """Validates (gate (Is, H), up (Is, H), down (H, Is)); True when the GEMV kernels can run it as Is / I slices."""
    gate, up, down = shared
    Is = gate.shape[0]
    if gate.shape != (Is, H) or up.shape != (Is, H) or down.shape != (H, Is):
        raise ValueError(f"shared expert weights must be gate (Is, H), up (Is, H), down (H, Is) with H={H}; got "
                         f"{tuple(gate.shape)}, {tuple(up.shape)}, {tuple(down.shape)}")
    return (Is % I == 0 and all(w.dtype == dtype and w.stride(1) == 1 for w in shared)
            and gate.stride(0) == up.stride(0))


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, *, config: dict | None = None,
              shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Routed SwiGLU experts: x (T, H), gate_up (E, 2I, H) = [gate; up], down (E, H, I), topk_ids (T, k) int32/int64,
    topk_weights (T, k) float32 -> (T, H) in x's dtype.

    On CUDA with Triton and bf16/fp16 this runs the fused kernels (no host sync, CUDA-graph capturable; expert ids
    are not range-checked there). Otherwise it runs `fused_moe_ref`. `config` overrides the tuned tile config
    (see MOE_CONFIGS) and is meant for tuning.

    shared: the (gate, up, down) weights of a shared SwiGLU expert (DeepSeek's shared experts), added to the
    result. In the small-batch path it runs inside the routed kernels as Is / I more experts of weight 1 (at decode
    three launches for the whole feed-forward instead of nine); elsewhere it runs as `shared_mlp_ref`.
    """
    T, H, E, I, k = _check(x, gate_up, down, topk_ids, topk_weights)
    fusable = shared is not None and _check_shared(shared, H, I, x.dtype)
    if not (HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        out = fused_moe_ref(x, gate_up, down, topk_ids, topk_weights)
        return out if shared is None else out + shared_mlp_ref(x, shared)
    if T == 0:
        return x.new_empty(0, H)
    if gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("gate_up and down must be contiguous along their last (input) dimension")
    if x.stride(1) != 1:
        x = x.contiguous()
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    cfg = config or moe_config(T, H, I)
    if cfg["path"] == "gemv" and fusable:
        return _fused_moe_gemv(x, gate_up, down, ids, weights, T, H, I, k, cfg, shared)
    if cfg["path"] == "gemv":
        out = _fused_moe_gemv(x, gate_up, down, ids, weights, T, H, I, k, cfg)
    else:
        out = _fused_moe_gemm(x, gate_up, down, ids, weights, T, H, E, I, k, cfg)
    return out if shared is None else out + shared_mlp_ref(x, shared)


# ---------------------------------------------------------------------------------------------------- quantized experts
# (qweight, scales, zeros or None) of stacked experts, in the format of mixr.kernels.quant_gemm
QuantTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _check_quant(x: torch.Tensor, gate_up_q: QuantTensors, down_q: QuantTensors, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, bits: int) -> tuple[int, int, int, int, int, int, int]:
    """Returns T, H, E, I, k and the group sizes of gate_up and down."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"expected x (T, H) floating, got {x.dtype} {tuple(x.shape)}")
    if len(gate_up_q) != 3 or len(down_q) != 3:
        raise ValueError("gate_up_q and down_q must be (qweight, scales, zeros or None)")
    if gate_up_q[0].dim() != 3 or down_q[0].dim() != 3:
        raise ValueError(f"expected stacked qweights (E, N, K'); got {tuple(gate_up_q[0].shape)}, "
                         f"{tuple(down_q[0].shape)}")
    T, H = x.shape
    E = gate_up_q[0].shape[0]
    two_i, _, g_up = check_packed(*gate_up_q, bits, H)
    H2, I, g_down = check_packed(*down_q, bits)
    if two_i != 2 * I or H2 != H or down_q[0].shape[0] != E:
        raise ValueError(f"shape mismatch: x (T={T}, H={H}); gate_up holds {tuple(gate_up_q[0].shape[:2])} rows "
                         f"(must be (E, 2I)), down {down_q[0].shape[0]} x {H2} x I={I} (must be (E, H, I))")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be (T={T}, k)")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"topk_weights must be float32, got {topk_weights.dtype}")
    tensors = [x, topk_ids, topk_weights, *(t for t in (*gate_up_q, *down_q) if t is not None)]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return T, H, E, I, topk_ids.shape[1], g_up, g_down


def fused_moe_quant_ref(x: torch.Tensor, gate_up_q: QuantTensors, down_q: QuantTensors, topk_ids: torch.Tensor,
                        topk_weights: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantize the experts that were chosen to x's dtype, then `fused_moe_ref` (host syncs)."""
    T, H, E, I, k, _, _ = _check_quant(x, gate_up_q, down_q, topk_ids, topk_weights, bits)
    used = topk_ids[topk_ids >= 0].unique()  # sorted
    if used.numel() and used[-1] >= E:
        raise ValueError(f"topk_ids holds expert {used[-1].item()}, but there are only {E} experts")
    ids = torch.where(topk_ids >= 0, torch.searchsorted(used, topk_ids.clamp_min(0).contiguous()), -1)

    def deq(q: QuantTensors) -> torch.Tensor:
        return dequantize(q[0][used], q[1][used], None if q[2] is None else q[2][used], bits, x.dtype)

    return fused_moe_ref(x, deq(gate_up_q), deq(down_q), ids.to(topk_ids.dtype), topk_weights)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["top_k", "n_shared"])
    def _moe_qgemv_gate_up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, act_ptr, gw_ptr, gs_ptr, gz_ptr,
                                  uw_ptr, us_ptr, uz_ptr, H, I, top_k, n_shared,
                                  stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn,
                                  stride_swn, stride_ssn, stride_szn,
                                  BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                                  PIPE: tl.constexpr):
        # act[p, n] = silu(gate[e] x[t]) * (up[e] x[t]) for pair p = t*(top_k + n_shared) + j; pairs j >= top_k are
        # the shared expert's I-wide slices j - top_k of its packed gate (gw/gs/gz) and up (uw/us/uz) weights.
        p = tl.program_id(0)
        kk = top_k + n_shared
        t = p // kk
        j = p % kk
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        x_row = x_ptr + t * stride_xm
        if j < top_k:
            e = tl.load(ids_ptr + t * top_k + j).to(tl.int64)
            if e < 0:
                return  # a skipped pair: its act row is never read
            # One pass over 2*BLOCK_N rows, the tile's gate rows then its up rows: twice the bytes in flight per
            # step and x loaded once. Rows wrap instead of being masked (dropped at the store).
            r = tl.arange(0, 2 * BLOCK_N)
            rows2 = ((tl.program_id(1) * BLOCK_N + r % BLOCK_N) % I + (r // BLOCK_N) * I).to(tl.int64)
            gu = qgemv_rows(x_row, w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_ze, rows2,
                            stride_wn, stride_sn, stride_zn, 0, H, BITS, GROUP, HAS_Z, 2 * BLOCK_N, BLOCK_K, DOT,
                            PIPE)
            g, u = tl.split(tl.trans(tl.reshape(gu, (2, BLOCK_N))))
        else:
            srows = ((j - top_k) * I + offs_n % I).to(tl.int64)
            g = qgemv_rows(x_row, gw_ptr, gs_ptr, gz_ptr, srows, stride_swn, stride_ssn, stride_szn, 0, H,
                           BITS, GROUP, HAS_Z, BLOCK_N, BLOCK_K, DOT, PIPE)
            u = qgemv_rows(x_row, uw_ptr, us_ptr, uz_ptr, srows, stride_swn, stride_ssn, stride_szn, 0, H,
                           BITS, GROUP, HAS_Z, BLOCK_N, BLOCK_K, DOT, PIPE)
        tl.store(act_ptr + p * I + offs_n, (g * tl.sigmoid(g) * u).to(act_ptr.dtype.element_ty), mask=offs_n < I)

    @triton.jit(do_not_specialize=["top_k", "n_shared"])
    def _moe_qgemv_down_kernel(act_ptr, w_ptr, s_ptr, z_ptr, ids_ptr, topk_w_ptr, out_ptr, dw_ptr, ds_ptr, dz_ptr,
                               part_ptr, cnt_ptr, H, I, top_k, n_shared,
                               stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn,
                               stride_swn, stride_ssn, stride_szn, stride_om,
                               BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                               PIPE: tl.constexpr):
        # part[p, n] = w[p] * down[e] act[p] for pair p (laid out as in the gate_up kernel; the shared slice j >=
        # top_k reads columns (j - top_k) * I .. + I of the packed shared down dw/ds/dz (H, n_shared * I), weight
        # 1); the last of a token's pairs to finish sums them into out[t].
        p = tl.program_id(0)
        kk = top_k + n_shared
        t = p // kk
        j = p % kk
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (offs_n % H).to(tl.int64)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        if j < top_k:
            e = tl.load(ids_ptr + t * top_k + j).to(tl.int64)
            if e >= 0:  # a skipped pair adds zeros
                acc = qgemv_rows(act_ptr + p * I, w_ptr + e * stride_we, s_ptr + e * stride_se,
                                 z_ptr + e * stride_ze, rows, stride_wn, stride_sn, stride_zn, 0, I,
                                 BITS, GROUP, HAS_Z, BLOCK_N, BLOCK_K, DOT, PIPE)
                acc = acc * tl.load(topk_w_ptr + t * top_k + j)
        else:
            c0 = (j - top_k) * I  # qgemv_rows indexes x by absolute column: shift act back by c0
            acc = qgemv_rows(act_ptr + p * I - c0, dw_ptr, ds_ptr, dz_ptr, rows, stride_swn, stride_ssn, stride_szn,
                             c0, c0 + I, BITS, GROUP, HAS_Z, BLOCK_N, BLOCK_K, DOT, PIPE)
        sum_pairs_last(acc, part_ptr, cnt_ptr, out_ptr, p, kk, offs_n, H, stride_om)

    @triton.jit(do_not_specialize=["n_pairs", "max_blocks_m", "a_row_div"])
    def _moe_qgemm_kernel(
        a_ptr, w_ptr, s_ptr, z_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, num_blocks_ptr,
        N, K, n_pairs, max_blocks_m,
        a_row_div,  # top_k when A's rows are tokens (gate+up), 1 when they are pairs (down)
        stride_am, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_cm,
        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
        GATE_UP: tl.constexpr, MUL_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # _moe_gemm_kernel with the expert's weight tiles dequantized in the K loop (qmm_loop)
        pid = tl.program_id(0)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(max_blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m
        if pid_m >= tl.load(num_blocks_ptr):
            return
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # sentinel n_pairs in padding
        row_mask = pairs < n_pairs
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        rows = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        a_rows = a_ptr + (pairs // a_row_div).to(tl.int64) * stride_am
        w, s, z = w_ptr + e * stride_we, s_ptr + e * stride_se, z_ptr + e * stride_ze
        acc = qmm_loop(a_rows, row_mask, w, s, z, rows, stride_wn, stride_sn, stride_zn, 0, K,
                       tl.zeros((BLOCK_M, BLOCK_N), tl.float32), BITS, GROUP, HAS_Z, BLOCK_K)
        if GATE_UP:
            up = qmm_loop(a_rows, row_mask, w, s, z, rows + N, stride_wn, stride_sn, stride_zn, 0, K,
                          tl.zeros((BLOCK_M, BLOCK_N), tl.float32), BITS, GROUP, HAS_Z, BLOCK_K)
            acc = acc * tl.sigmoid(acc) * up
        if MUL_WEIGHT:
            acc = acc * tl.load(topk_w_ptr + pairs, mask=row_mask, other=0.0)[:, None]
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & (cols < N)[None, :])


# gemv: UP_N/UP_K and DOWN_N/DOWN_K tile the two GEMVs (int4: K tiles are whole groups); PIPE > 1 pipelines the FMA
# loop's loads over PIPE cp.async buffers (else a register double buffer); DOT runs them on the tensor cores with
# num_stages load buffers. gemm: BLOCK_M and per GEMM BLOCK_N, BLOCK_K (int8 only: int4 steps one group), GROUP_M,
# num_warps, num_stages. bench/bench_quant_kernels.py; the gemv tiles by bench/tune_quant_moe.py on an H100 at
# DeepSeek-V2-Lite's shape with the shared expert fused (int4 g64, T=1: 37.1 -> 33.9 us; T=8: 194 -> 181 us).
# int8 at T=1 on the tensor cores (--dot): 36.1 us against 40.7 with the register-buffered FMA tile
# (tune-quant-moe-dot-v2lite-h100-2026-11-24.json; no FMA tile with 1-8 warps beat 41.3, tune-quant-moe-warps-*).
# In a trial kernel that read the int8 bytes as fp8, with no dequantization at all, the dot path took the same 35 us:
# it is bound by its pipelined loads. With its loads pipelined too (--pipes 3), the FMA loop ties it at T=1 (36.1
# against 35.9) and beats it from 2 tokens on: 55.7 / 88.0 / 153.6 us at T = 2 / 4 / 8 against 57.9 / 93.7 / 162.3
# (tune-quant-moe-pipe-v2lite-h100-2026-11-24*.json). int4 gains nothing from pipelining (33.1 us at T=1 with the
# register buffer, 34.8 with PIPE=3; a trial with half the instructions per weight, pipelined, was no faster either:
# what bounds it is not known), and on the tensor cores it took twice its FMA loop's time or more, one 64-wide group
# a step (qmm_loop) or several with the scales gathered per weight.
def _qgemv(up_n, up_k, down_n, down_k, warps=4, down_warps=None, dot=False, stages=3, pipe=1):
    return dict(path="gemv", UP_N=up_n, UP_K=up_k, DOWN_N=down_n, DOWN_K=down_k, num_warps=warps,
                DOWN_WARPS=down_warps or warps, DOT=dot, num_stages=stages, PIPE=pipe)


def _qgemm(bm, up, down):
    keys = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    return dict(path="gemm", BLOCK_M=bm, up=dict(zip(keys, up)), down=dict(zip(keys, down)))


def moe_quant_config(T: int, H: int, I: int, bits: int, group: int = 0) -> dict:
    """group: the int4 group size; the gemv K tiles are at least one group."""
    if T <= 8 and bits == 8:
        return (_qgemv(32, 128, 32, 128, dot=True, stages=5) if T == 1 else _qgemv(16, 512, 32, 256, pipe=3) if T == 2
                else _qgemv(16, 256, 128, 128, pipe=3) if T <= 4 else _qgemv(32, 256, 128, 128, pipe=3))
    if T <= 8:
        up_n, up_k, down_n, down_k = (16, 512, 32, 256) if T == 1 else (16, 512, 64, 128)
        return _qgemv(up_n, max(up_k, group), down_n, max(down_k, group))
    if T <= 32:
        return (_qgemm(16, (128, 128, 1, 4, 3), (128, 128, 1, 4, 3)) if bits == 4 else
                _qgemm(16, (32, 128, 1, 4, 4), (32, 128, 1, 4, 4)))
    # Past 32 tokens int4 keeps 16-row blocks: fewer rows per block, but each weight tile dequantized for fewer
    # padded rows; at 64 / 128 / 256 tokens 305 / 313 / 531 us against 520 / 524 / 577 with 32-row blocks (bf16: 393
    # / 398 / 405). int8 at 64 and 128: 236 / 239 us with 8 warps, 251 / 256 with 4 (quant-kernels-moe-sweep-bm-*).
    # int4 from DEQUANT_MIN_T tokens on dequantizes the experts instead.
    if bits == 4:
        return _qgemm(16, (128, 128, 1 if T <= 128 else 8, 4, 3), (128, 128, 1 if T <= 128 else 8, 4, 3))
    if T <= 128:
        return _qgemm(16, (128, 128, 1, 8, 3), (128, 128, 1, 8, 3))
    if T <= 256:
        return _qgemm(32, (128, 128, 1, 4, 3), (128, 128, 1, 4, 3))
    return _qgemm(64, (128, 128, 8, 8, 3), (128, 128, 8, 8, 3))


def fused_moe_quant_triton(x: torch.Tensor, gate_up_q: QuantTensors, down_q: QuantTensors, topk_ids: torch.Tensor,
                           topk_weights: torch.Tensor, bits: int, config: dict | None = None,
                           shared: tuple[QuantTensors, QuantTensors, QuantTensors] | None = None) -> torch.Tensor:
    """The Triton path of fused_moe_quant; callable directly (tests run it under the Triton interpreter)."""
    T, H, E, I, k, g_up, g_down = _check_quant(x, gate_up_q, down_q, topk_ids, topk_weights, bits)
    cfg = config or moe_quant_config(T, H, I, bits, max(g_up, g_down) if bits == 4 else 0)
    if shared is not None and not (cfg["path"] == "gemv" and _check_quant_shared(shared, H, I, bits, g_up, g_down,
                                                                            gate_up_q[2] is not None)):
        return (fused_moe_quant_triton(x, gate_up_q, down_q, topk_ids, topk_weights, bits, config)
                + shared_mlp_quant(x, shared, bits))
    if T == 0:
        return x.new_empty(0, H)
    if x.stride(1) != 1:
        x = x.contiguous()
    for t in (*gate_up_q, *down_q):
        if t is not None and t.stride(-1) != 1:
            raise ValueError("expert qweights, scales and zeros must be contiguous along their last dimension")
    ids, weights = topk_ids.contiguous(), topk_weights.contiguous()
    n = T * k

    def operands(q: QuantTensors):
        qw, s, z = q
        z = s if z is None else z  # never read without HAS_Z
        return (qw, s, z), (*qw.stride()[:2], *s.stride()[:2], *z.stride()[:2])

    (gu, gu_strides), (dn, dn_strides) = operands(gate_up_q), operands(down_q)
    # int8 ignores GROUP (one group a row): 0 keeps one compiled kernel for every K
    up_common = dict(BITS=bits, GROUP=g_up if bits == 4 else 0, HAS_Z=gate_up_q[2] is not None)
    dn_common = dict(BITS=bits, GROUP=g_down if bits == 4 else 0, HAS_Z=down_q[2] is not None)
    if cfg["path"] == "gemv":
        if bits == 4 and (cfg["UP_K"] % g_up or cfg["DOWN_K"] % g_down):
            raise ValueError(f"int4 UP_K/DOWN_K must be multiples of the group sizes {g_up}, {g_down}")
        n_sh = 0 if shared is None else shared[0][0].shape[0] // I
        sg, su, sd = shared if shared is not None else (gate_up_q, gate_up_q, down_q)  # placeholders, never read
        (sg, sg_str), (su, _), (sd, sd_str) = (operands(q) for q in (sg, su, sd))
        kk = k + n_sh
        dot, stages, pipe = cfg.get("DOT", False), cfg.get("num_stages", 3), cfg.get("PIPE", 1)
        act = torch.empty(T * kk, I, dtype=x.dtype, device=x.device)
        _moe_qgemv_gate_up_kernel[(T * kk, triton.cdiv(I, cfg["UP_N"]))](
            x, *gu, ids, act, *sg, *su, H, I, k, n_sh, x.stride(0), *gu_strides, *sg_str[0::2], **up_common,
            BLOCK_N=cfg["UP_N"], BLOCK_K=cfg["UP_K"], DOT=dot, PIPE=pipe, num_warps=cfg["num_warps"], num_stages=stages)
        n_tiles = triton.cdiv(H, cfg["DOWN_N"])
        cnt = arrival_counters(x.device, T * n_tiles)
        if cnt is None:  # too many tiles for the persistent counters: zeroed ones for this call
            cnt = torch.zeros(T * n_tiles, dtype=torch.int32, device=x.device)
        out = torch.empty(T, H, dtype=x.dtype, device=x.device)
        part = torch.empty(T * kk, H, dtype=torch.float32, device=x.device)
        _moe_qgemv_down_kernel[(T * kk, n_tiles)](
            act, *dn, ids, weights, out, *sd, part, cnt, H, I, k, n_sh, *dn_strides, *sd_str[0::2], out.stride(0),
            **dn_common, BLOCK_N=cfg["DOWN_N"], BLOCK_K=cfg["DOWN_K"], DOT=dot, PIPE=pipe,
            num_warps=cfg.get("DOWN_WARPS", cfg["num_warps"]), num_stages=stages)
        return out
    act = torch.empty(n, I, dtype=x.dtype, device=x.device)
    y = torch.empty(n, H, dtype=x.dtype, device=x.device)  # weighted per-pair outputs
    bm = cfg["BLOCK_M"]
    sorted_ids, expert_ids, num_blocks = moe_align(ids, E, bm)
    max_blocks = expert_ids.numel()
    for (out, a, a_stride, q, strides, common, N, K, gate_up, row_div, c) in (
            (act, x, x.stride(0), gu, gu_strides, up_common, I, H, True, k, cfg["up"]),
            (y, act, act.stride(0), dn, dn_strides, dn_common, H, I, False, 1, cfg["down"])):
        _moe_qgemm_kernel[(max_blocks * triton.cdiv(N, c["BLOCK_N"]),)](
            a, *q, out, weights, sorted_ids, expert_ids, num_blocks, N, K, n, max_blocks, row_div,
            a_stride, *strides, out.stride(0), **common, GATE_UP=gate_up, MUL_WEIGHT=not gate_up,
            BLOCK_M=bm, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
            num_warps=c["num_warps"], num_stages=c["num_stages"])
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    _moe_sum_kernel[(T, triton.cdiv(H, 1024))](y, ids, out, H, k, BLOCK_N=1024, num_warps=4)  # skips -1 rows
    return out


def _check_quant_shared(shared, H: int, I: int, bits: int, g_up: int, g_down: int, has_z: bool) -> bool:
    """Validates packed (gate (Is, H), up (Is, H), down (H, Is)); True when the GEMV kernels can run them as Is / I
    slices (same format and groups as the routed experts, gate and up laid out alike)."""
    if len(shared) != 3 or any(len(q) != 3 for q in shared):
        raise ValueError("shared expert weights must be three packed (qweight, scales, zeros or None) triples")
    (Is, _, g_gate), (Is2, _, g_upw) = check_packed(*shared[0], bits, H), check_packed(*shared[1], bits, H)
    H2, Is3, g_dn = check_packed(*shared[2], bits)
    if Is2 != Is or Is3 != Is or H2 != H:
        raise ValueError(f"shared expert weights must be gate (Is, H), up (Is, H), down (H, Is) with H={H}; got "
                         f"{[tuple(q[0].shape) for q in shared]}")
    same_layout = all(a.stride() == b.stride() for a, b in zip(shared[0], shared[1]) if a is not None)
    zero_point = {q[2] is not None for q in shared} | {has_z}
    return (Is % I == 0 and same_layout and (bits == 8 or (g_gate, g_upw, g_dn) == (g_up, g_up, g_down))
            and len(zero_point) == 1 and all(t.stride(-1) == 1 for q in shared for t in q if t is not None))


def shared_mlp_quant(x: torch.Tensor, shared: tuple[QuantTensors, QuantTensors, QuantTensors], bits: int
                     ) -> torch.Tensor:
    """The shared SwiGLU expert on packed weights, as separate quantized linears."""
    gate, up = (quant_linear(x, *q, bits) for q in shared[:2])
    return quant_linear(F.silu(gate) * up, *shared[2], bits)


def fused_moe_quant(x: torch.Tensor, gate_up_q: QuantTensors, down_q: QuantTensors, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, bits: int, *, config: dict | None = None,
                    shared: tuple[QuantTensors, QuantTensors, QuantTensors] | None = None) -> torch.Tensor:
    """fused_moe on packed experts: gate_up_q = (qweight (E, 2I, H // 2 or H), scales (E, 2I, H // G), zeros or None),
    down_q likewise for (E, H, I); bits 4 or 8 (see mixr.kernels.quant_gemm for the format) -> (T, H) in x's dtype.

    On CUDA with Triton and bf16/fp16 this runs the Triton kernels (no host sync); otherwise, or for int4 groups
    that are not 32..256 (a power of two), `fused_moe_quant_ref`. `config` overrides moe_quant_config (tuning).
    shared: a shared expert's packed (gate, up, down), added to the result; at decode batch sizes it runs inside
    the routed GEMV kernels as more pairs of weight 1 (as in `fused_moe`).
    """
    T, H, E, I, k, g_up, g_down = _check_quant(x, gate_up_q, down_q, topk_ids, topk_weights, bits)
    fast = HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    if bits == 4 and not {g_up, g_down} <= {32, 64, 128, 256}:
        fast = False
    if not fast:
        out = fused_moe_quant_ref(x, gate_up_q, down_q, topk_ids, topk_weights, bits)
    elif config is None and T >= DEQUANT_MIN_T[bits] and 3 * E * H * I * x.element_size() <= DEQUANT_MAX_BYTES:
        # prefill: every expert dequantized once, then the bf16 grouped GEMMs (as quant_linear's "dequant" path)
        out = fused_moe(x, _dequantized(gate_up_q, bits, x.dtype), _dequantized(down_q, bits, x.dtype), topk_ids,
                        topk_weights)
    else:
        return fused_moe_quant_triton(x, gate_up_q, down_q, topk_ids, topk_weights, bits, config, shared)
    return out if shared is None else out + shared_mlp_quant(x, shared, bits)


# From this many tokens on, fused_moe_quant dequantizes all experts (their dense copy up to DEQUANT_MAX_BYTES) and runs
# the bf16 kernels: the quantized grouped GEMMs dequantize every weight tile once per token block, which grows with the
# tokens. One V2-Lite MoE layer on an H100 (bench_quant_kernels.py --only moe, quant-kernels-moe-prefill-h100-*, with
# the 32- and 64-row tiles of before moe_quant_config's 16-row ones; not remeasured since):
# int4 at 256 / 512 / 4096 / 8192 tokens 595 / 1538 / 9260 / 17820 us in the loop, 945 / 995 / 1487 / 2273 us
# dequantized (bf16: 402 / 458 / 1046 / 1809); int8 2018 against 1567 at 4096, but 1105 against 1201 at 2048.
DEQUANT_MIN_T = {4: 512, 8: 4096}
DEQUANT_MAX_BYTES = 2 << 30


def _dequantized(q: QuantTensors, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed stacked experts (E, N, K') -> dense (E, N, K) in dtype, one Triton launch."""
    w, s, z = q
    dense = dequantize_triton(w.flatten(0, 1), s.flatten(0, 1), None if z is None else z.flatten(0, 1), bits, dtype)
    return dense.view(w.shape[0], w.shape[1], -1)
