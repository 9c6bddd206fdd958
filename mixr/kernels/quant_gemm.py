"""Weight-only quantized GEMM: the packed formats, their plain-PyTorch references, and the dispatch.

Formats (the same in memory and in a saved checkpoint), for a weight W (..., N, K) used as y = x @ W^T:
  int8  qweight int8 (..., N, K); scales (..., N, 1) in the model dtype; symmetric:  W = q * s
  int4  qweight uint8 (..., N, K // 2), byte j of a row holding k = 2j in its low nibble and k = 2j + 1 in its
        high nibble, q in 0..15; scales (..., N, K // G) in the model dtype; zeros (..., N, K // G) uint8 in
        0..15, or None for symmetric (zero point 8):   W[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]
The leading dims are empty for a linear layer and (E,) for stacked experts. For int8, G = K (one group a row).

CUDA path (Triton, bf16/fp16 activations), dequantizing inside the K loop, no host sync (CUDA-graph capturable):
  gemv (decode: int8 1 row, or 2-3 of a small layer; int4 1-2 rows): program (row m, n-tile, k-split) streams
      BLOCK_N weight rows and reduces them against one row of x with FMAs, the next step's tiles loaded into
      registers during this one's math, or (PIPE > 1) pipelined through shared memory by the compiler (cp.async);
      programs of consecutive m share a weight tile, which the later ones read from L2. Small layers split K so
      that there are enough programs to keep HBM busy; the fp32 partials are summed (with the bias) by a second
      small kernel.
  gemm (up to 16 rows): tiles of (BLOCK_M, BLOCK_N) with tl.dot on the dequantized weight tile, one int4 group (or
      BLOCK_K int8 columns) per step, optionally split along K as above.
  dequant (more rows, prefill): a Triton kernel writes the dense weight, then F.linear (cuBLAS).
Integers become floats by bit tricks rather than int->float conversions (16 per clock per SM, which would bound
the int4 GEMV): OR-ing q into the mantissa of 2^23 and subtracting 2^23, or shifting a nibble into the top of the
mantissa of 1.0, which gives 1 + q/16 and leaves the offsets to a per-group correction.
The jit helpers `qgemv_rows` and `qmm_loop` are shared with the quantized fused MoE (mixr.kernels.fused_moe), whose
int8 GEMVs run `qgemv_rows` with DOT (through `qmm_loop` on the tensor cores) at one token and with PIPE at 2-8.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

HAS_TRITON = triton is not None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) integers in 0..15 -> (..., K // 2) uint8, even k in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., K // 2) uint8 -> (..., K) uint8 in 0..15."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Packed weight -> dense (..., N, K) in `dtype` (default: the scales' dtype). Group size = K / scales.shape[-1]."""
    dtype = dtype or scales.dtype
    if bits == 8:
        q = qweight.float()
        zero = None
    elif bits == 4:
        q = unpack_int4(qweight).float()
        zero = 8.0 if zeros is None else zeros.float()
    else:
        raise ValueError(f"unsupported bits={bits} (4, 8)")
    groups = scales.shape[-1]
    K = q.shape[-1]
    if K % groups:
        raise ValueError(f"K={K} is not a multiple of the {groups} scale groups")
    q = q.unflatten(-1, (groups, K // groups))
    if zero is not None:
        q = q - (zero if isinstance(zero, float) else zero[..., None])
    return (q * scales.float()[..., None]).flatten(-2).to(dtype)


def quant_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize(W)^T (+ bias), in x's dtype."""
    return F.linear(x, dequantize(qweight, scales, zeros, bits, x.dtype), bias)


def check_packed(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                 K: int | None = None) -> tuple[int, int, int]:
    """Validate one packed weight (..., N, K') against the format; returns (N, K, G)."""
    if bits not in (4, 8):
        raise ValueError(f"unsupported bits={bits} (4, 8)")
    want = torch.int8 if bits == 8 else torch.uint8
    if qweight.dtype != want:
        raise TypeError(f"int{bits} qweight must be {want}, got {qweight.dtype}")
    N, Kp = qweight.shape[-2:]
    k = Kp * (2 if bits == 4 else 1)
    if K is not None and k != K:
        raise ValueError(f"qweight {tuple(qweight.shape)} holds K={k} input features, expected {K}")
    if scales.shape[:-1] != qweight.shape[:-1]:
        raise ValueError(f"scales {tuple(scales.shape)} do not match qweight {tuple(qweight.shape)}")
    groups = scales.shape[-1]
    if bits == 8 and groups != 1:
        raise ValueError(f"int8 scales are per output channel (..., N, 1), got {tuple(scales.shape)}")
    if groups < 1 or k % groups:
        raise ValueError(f"K={k} is not a multiple of the {groups} scale groups")
    if zeros is not None:
        if bits == 8:
            raise ValueError("int8 is symmetric: zeros must be None")
        if zeros.shape != scales.shape or zeros.dtype != torch.uint8:
            raise ValueError(f"zeros must be uint8 shaped like scales {tuple(scales.shape)}, got "
                             f"{zeros.dtype} {tuple(zeros.shape)}")
    return N, k, k // groups


if HAS_TRITON:

    @triton.jit
    def _qgemv_load(x_ptr, w_ptr, s_ptr, z_ptr, rows, stride_wn, stride_sn, stride_zn, k0, k_end,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_K: tl.constexpr):
        # one qgemv_rows step's tiles from column k0: int8 (w (BN, BK), x (BK,)); int4 (w (BN, NG, G/2) bytes, x as
        # (NG, G/2, 2) pairs, s and z (BN, NG)). s and z are placeholders for int8 (its scales apply at the end).
        if BITS == 8:
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * stride_wn + k[None, :], mask=(k < k_end)[None, :], other=0)
            xv = tl.load(x_ptr + k, mask=k < k_end, other=0.0)
            return w, xv, xv, xv
        else:
            grp = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)  # (NG,)
            g_mask = grp < k_end // GROUP
            byte = grp[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]  # (NG, G/2)
            w = tl.load(w_ptr + rows[:, None, None] * stride_wn + byte[None, :, :], mask=g_mask[None, :, None],
                        other=0)
            xv = tl.load(x_ptr + 2 * byte[:, :, None] + tl.arange(0, 2)[None, None, :], mask=g_mask[:, None, None],
                         other=0.0)
            s = tl.load(s_ptr + rows[:, None] * stride_sn + grp[None, :], mask=g_mask[None, :], other=0.0)
            z = tl.load(z_ptr + rows[:, None] * stride_zn + grp[None, :], mask=g_mask[None, :], other=0) if HAS_Z else s
            return w, xv, s, z

    @triton.jit
    def _qgemv_step(w, xv, s, z, BITS: tl.constexpr, HAS_Z: tl.constexpr):
        # (BN,) fp32 partial sums of one step's tiles (see _qgemv_load); int8 without its scales
        if BITS == 8:
            # q + 128 in 0..255 sits in the mantissa of 2^23: the float is 2^23 + 128 + q
            wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            return tl.sum(wf * xv.to(tl.float32)[None, :], 1)
        else:
            x_even, x_odd = tl.split(xv.to(tl.float32))  # (NG, G/2)
            x_sum = tl.sum(x_even + x_odd, 1)  # (NG,)
            # A nibble shifted into the top of the mantissa of 1.0 is the float 1 + q/16: two integer ops, no
            # int->float conversion (16 per clock per SM) and no subtraction per weight. Per group,
            # sum (1 + q/16) x = x_sum + (sum q x) / 16, so sum (q - z) x = 16 part - (16 + z) x_sum.
            wi = w.to(tl.int32)
            lo = (((wi << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            hi = (((wi << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            part = tl.sum(lo * x_even[None, :, :], 2) + tl.sum(hi * x_odd[None, :, :], 2)  # (BN, NG)
            zf = z.to(tl.float32) if HAS_Z else 8.0
            return tl.sum(s.to(tl.float32) * (16.0 * part - (16.0 + zf) * x_sum[None, :]), 1)

    @triton.jit
    def qgemv_rows(x_ptr, w_ptr, s_ptr, z_ptr, rows, stride_wn, stride_sn, stride_zn, k_start, k_end,
                   BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr, PIPE: tl.constexpr):
        # sum over k in [k_start, k_end) of dequant(W)[rows, k] * x[k] -> (BLOCK_N,) fp32.
        # rows: (BLOCK_N,) int64, all in range (callers wrap them); w/s/z_ptr: this matrix's (expert's) base.
        # DOT: on the tensor cores instead, x padded to 16 rows (15 masked, never loaded) through qmm_loop, whose
        # loads the compiler pipelines over num_stages buffers (BLOCK_N >= 16). For int8 MoE experts at 1-8 tokens
        # on an H100 this beats the FMA loop below; the int4 qmm_loop, one group per step, does not (see
        # fused_moe.moe_quant_config).
        if DOT:
            m = tl.arange(0, 16)
            acc2 = qmm_loop(x_ptr + m * 0, m == 0, w_ptr, s_ptr, z_ptr, rows, stride_wn, stride_sn, stride_zn,
                            k_start, k_end, tl.zeros((16, BLOCK_N), tl.float32), BITS, GROUP, HAS_Z, BLOCK_K)
            return tl.sum(tl.where((m == 0)[:, None], acc2, 0.0), 0)
        # int4: k_start, k_end and BLOCK_K are multiples of GROUP; a tile is (BLOCK_N, BLOCK_K // GROUP groups,
        # GROUP // 2 bytes), masked by whole groups, so the loads stay 16-byte vectors.
        # PIPE > 1: the compiler pipelines the step's loads over PIPE cp.async buffers in shared memory. Otherwise
        # each step loads the next step's tiles before computing on the current ones (a register double buffer):
        # with nothing else in flight, a GEMV would wait out the memory latency once per step.
        acc = tl.zeros((BLOCK_N,), tl.float32)
        if PIPE > 1:
            for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=PIPE):
                w, xv, s, z = _qgemv_load(x_ptr, w_ptr, s_ptr, z_ptr, rows, stride_wn, stride_sn, stride_zn, k0,
                                          k_end, BITS, GROUP, HAS_Z, BLOCK_K)
                acc += _qgemv_step(w, xv, s, z, BITS, HAS_Z)
        else:
            w, xv, s, z = _qgemv_load(x_ptr, w_ptr, s_ptr, z_ptr, rows, stride_wn, stride_sn, stride_zn, k_start,
                                      k_end, BITS, GROUP, HAS_Z, BLOCK_K)
            for k0 in range(k_start, k_end, BLOCK_K):
                nxt = _qgemv_load(x_ptr, w_ptr, s_ptr, z_ptr, rows, stride_wn, stride_sn, stride_zn, k0 + BLOCK_K,
                                  k_end, BITS, GROUP, HAS_Z, BLOCK_K)
                acc += _qgemv_step(w, xv, s, z, BITS, HAS_Z)
                w, xv, s, z = nxt
        if BITS == 8:
            acc = acc * tl.load(s_ptr + rows * stride_sn).to(tl.float32)
        return acc

    @triton.jit
    def qmm_loop(a_rows, a_mask, w_ptr, s_ptr, z_ptr, rows, stride_wn, stride_sn, stride_zn, k_start, k_end, acc,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_K: tl.constexpr):
        # acc (BM, BN) += A[a_rows, k] @ dequant(W)[rows, k]^T over k in [k_start, k_end).
        # a_rows: (BM,) pointers to the rows of A (contiguous along k); a_mask: (BM,) which rows exist.
        # int4: one group per step (BLOCK_K ignored), k_start/k_end multiples of GROUP; the weight tile is loaded
        # (G/2 bytes, BN) and its nibbles multiply the even and odd columns of A in two dots.
        dt = a_rows.dtype.element_ty
        if BITS == 8:
            offs_k = tl.arange(0, BLOCK_K)
            for k0 in range(k_start, k_end, BLOCK_K):
                k = k0 + offs_k
                k_mask = k < k_end
                a = tl.load(a_rows[:, None] + k[None, :], mask=a_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_ptr + rows[None, :] * stride_wn + k[:, None], mask=k_mask[:, None], other=0)
                wf = ((w.to(tl.int32) + 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # exact q
                acc = tl.dot(a, wf.to(dt), acc)
            acc = acc * tl.load(s_ptr + rows * stride_sn).to(tl.float32)[None, :]
        else:
            offs_j = tl.arange(0, GROUP // 2)
            w_col = w_ptr + rows[None, :] * stride_wn
            for g in range(k_start // GROUP, k_end // GROUP):
                byte = g * (GROUP // 2) + offs_j
                w = tl.load(w_col + byte[:, None])  # (G/2, BN)
                av = tl.load(a_rows[:, None, None] + 2 * byte[None, :, None] + tl.arange(0, 2)[None, None, :],
                             mask=a_mask[:, None, None], other=0.0)
                a_even, a_odd = tl.split(av)  # (BM, G/2)
                s = tl.load(s_ptr + rows * stride_sn + g).to(tl.float32)
                if HAS_Z:
                    zb = tl.load(z_ptr + rows * stride_zn + g).to(tl.float32) + 8388608.0
                else:
                    zb = tl.full((rows.shape[0],), 8388616.0, tl.float32)
                # (q - z) * s rounded to the activation dtype: the reference's dequantized weight, bit for bit
                lo = (((w & 0xF).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - zb[None, :]) * s[None, :]
                hi = (((w >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - zb[None, :]) * s[None, :]
                acc = tl.dot(a_even, lo.to(dt), acc)
                acc = tl.dot(a_odd, hi.to(dt), acc)
        return acc

    @triton.jit(do_not_specialize=["steps_per_split"])
    def _qgemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, steps_per_split,
                      stride_xm, stride_wn, stride_sn, stride_zn, stride_om, stride_os,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PIPE: tl.constexpr):
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (offs_n % N).to(tl.int64)  # wrapped, not masked: extra rows are dropped at the store
        # K offsets as multiples of the constexpr step, so the compiler knows they are aligned and keeps the loads
        # 16-byte vectors (an offset split * runtime_length has unknown alignment: one-element loads)
        k_start = split * steps_per_split * BLOCK_K
        acc = qgemv_rows(x_ptr + m * stride_xm, w_ptr, s_ptr, z_ptr, rows, stride_wn, stride_sn, stride_zn,
                         k_start, tl.minimum(k_start + steps_per_split * BLOCK_K, K), BITS, GROUP, HAS_Z,
                         BLOCK_N, BLOCK_K, False, PIPE)
        if PARTIAL:  # fp32 partial (splits, M, N); the reduce kernel adds the bias
            tl.store(out_ptr + split * stride_os + m * stride_om + offs_n, acc, mask=offs_n < N)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows).to(tl.float32)
            tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)

    @triton.jit(do_not_specialize=["M", "steps_per_split"])
    def _qgemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, steps_per_split,
                      stride_xm, stride_wn, stride_sn, stride_zn, stride_om, stride_os,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                      PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, STEP: tl.constexpr):  # STEP: K per loop step (int4: GROUP)
        pid = tl.program_id(0)
        split = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # GROUP_M row tiles per column tile launched together, so they share the weight tile in L2
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (offs_n % N).to(tl.int64)
        k_start = split * steps_per_split * STEP  # aligned K offsets (see _qgemv_kernel)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc = qmm_loop(x_ptr + offs_m.to(tl.int64) * stride_xm, m_mask, w_ptr, s_ptr, z_ptr, rows,
                       stride_wn, stride_sn, stride_zn, k_start, tl.minimum(k_start + steps_per_split * STEP, K), acc,
                       BITS, GROUP, HAS_Z, BLOCK_K)
        o_mask = m_mask[:, None] & (offs_n < N)[None, :]
        if PARTIAL:
            tl.store(out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=o_mask)
        else:
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=o_mask)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn, stride_on,
                        BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out (N, K) = dequant(W) in out's dtype; int4 tiles hold whole groups (BLOCK_K a multiple of GROUP)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r_mask = rows < N
        rows = rows.to(tl.int64)
        dt = out_ptr.dtype.element_ty
        if BITS == 8:
            k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask = r_mask[:, None] & (k < K)[None, :]
            w = tl.load(w_ptr + rows[:, None] * stride_wn + k[None, :], mask=mask, other=0)
            s = tl.load(s_ptr + rows * stride_sn, mask=r_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * stride_on + k[None, :], (w.to(tl.float32) * s[:, None]).to(dt),
                     mask=mask)
        else:
            grp = tl.program_id(1) * (BLOCK_K // GROUP) + tl.arange(0, BLOCK_K // GROUP)  # (NG,)
            mask2 = r_mask[:, None] & (grp < K // GROUP)[None, :]  # (BN, NG)
            byte = grp[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]
            w = tl.load(w_ptr + rows[:, None, None] * stride_wn + byte[None, :, :], mask=mask2[:, :, None], other=0)
            s = tl.load(s_ptr + rows[:, None] * stride_sn + grp[None, :], mask=mask2, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(z_ptr + rows[:, None] * stride_zn + grp[None, :], mask=mask2, other=0).to(tl.float32)
            else:
                z = tl.full((BLOCK_N, BLOCK_K // GROUP), 8.0, tl.float32)
            lo = ((w & 0xF).to(tl.float32) - z[:, :, None]) * s[:, :, None]
            hi = ((w >> 4).to(tl.float32) - z[:, :, None]) * s[:, :, None]
            # interleave: k = 2j from the low nibble, 2j + 1 from the high one
            deq = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K // GROUP, GROUP))
            k = grp[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # (NG, G)
            tl.store(out_ptr + rows[:, None, None] * stride_on + k[None, :, :], deq.to(dt), mask=mask2[:, :, None])

    @triton.jit(do_not_specialize=["MN", "splits"])
    def splitk_reduce_kernel(part_ptr, b_ptr, out_ptr, MN, N, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # out.flat[i] = sum_s part[s].flat[i] (+ bias[i % N]); part (splits, M, N) fp32, out (M, N) contiguous
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(splits):
            acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(part: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(splits, M, N) fp32 partial sums -> (M, N) in `dtype`, with the bias added."""
    splits, M, N = part.shape
    out = torch.empty(M, N, dtype=dtype, device=part.device)
    block = 1024
    splitk_reduce_kernel[(triton.cdiv(M * N, block),)](part, bias if bias is not None else part, out, M * N, N,
                                                        splits, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out


def dequantize_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """`dequantize` of one (N, K') packed matrix as a Triton kernel (no host sync)."""
    N, K, G = check_packed(qweight, scales, zeros, bits)
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    if N == 0:
        return out
    bk = max(G, 256) if bits == 4 else 256
    z = zeros if zeros is not None else scales
    _dequant_kernel[(triton.cdiv(N, 16), triton.cdiv(K, bk))](
        qweight, scales, z, out, N, K, qweight.stride(0), scales.stride(0), z.stride(0), out.stride(0),
        BITS=bits, GROUP=G if bits == 4 else 0, HAS_Z=zeros is not None, BLOCK_N=16, BLOCK_K=bk, num_warps=4)
    return out


# Tile configs. gemv: BLOCK_N rows x BLOCK_K columns per step; gemm: BLOCK_M x BLOCK_N tiles, BLOCK_K int8 columns
# per step (int4 steps one group), GROUP_M row tiles launched per column tile. Both split K until there are about
# `waves` x (multiprocessors) programs, with at least MIN_STEPS steps per split. Chosen on one H100 by
# bench/bench_quant_kernels.py (--sweep), which tries GEMV tiles up to GEMV_MAX_M rows.
GEMV_MAX_M = 4


def _gemv(bn, bk, warps=4, waves=4, min_steps=2, pipe=1):
    return dict(path="gemv", BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, waves=waves, MIN_STEPS=min_steps, PIPE=pipe)


def _gemm(bm, bn, bk=128, group_m=8, warps=4, stages=3, waves=2, min_steps=4):
    return dict(path="gemm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps,
                num_stages=stages, waves=waves, MIN_STEPS=min_steps)


# Past 16 rows the weight is dequantized to a bf16/fp16 temporary and multiplied by cuBLAS ("dequant"): the in-loop
# dequantization (several ALU ops per weight, per row tile) then costs more than writing and reading the dense copy
# once (H100, o_proj 2048x2048: M=256 int4 in-loop 41 us, dequant 11.5 us).
# Up to 16 rows (H100, bench_quant_kernels.py --only dense --sweep --dense-shapes q_kv_a,o_proj,dense_gate_up,
# dense_down --dense-m 1,2,3,4,8,16 --kinds int8,int4_g64: quant-kernels-dense-pipe-h100-2026-11-24*.json; us for
# V2-Lite's q_kv_a / o_proj / layer 0's dense MLP gate_up / down):
#   int8, one row: the GEMV with its loads pipelined (PIPE=2), 5.8 / 5.1 / 20.4 / 14.7 against 7.1 / 5.0 / 25.4 / 16.3
#     with the register double buffer (bf16: 7.7 / 6.3 / 34.9 / 19.4).
#   int8, 2-16 rows: the tensor-core tiles, which dequantize each weight tile once for all rows: 8.8 / 6.9 / 20.8 /
#     15.1 at 4 rows, where the GEMV took 16.5 / 10.5 / 86.0 / 42.0 (bf16 7.9 / 6.3 / 34.6 / 19.5), and 8.7 / 6.9 /
#     21.2 / 15.2 at 8, where dequant took 12.7 / 9.9 / 88.8 / 40.0; the GEMV keeps 2-3 rows of small layers (q_kv_a
#     at 2 rows 7.0 against 8.7).
#   int4, 1-2 rows: the GEMV, the 512-wide tile with 4 warps for large layers (gate_up / down at one row 19.2 / 13.4
#     against 23.4 / 15.4; q_kv_a / o_proj 7.6 / 6.1 against 6.6 / 4.8).
#   int4, 3-16 rows: tensor-core tiles of 128 columns: 11.6 / 9.4 / 33.8 / 23.3 at 3 rows against the GEMV's 13.9 /
#     8.3 / 63.4 / 33.8, and 78.2 us summed at 8 rows against 84.9 with 64 columns.
def quant_config(M: int, N: int, K: int, bits: int) -> dict:
    if bits == 8:
        if M == 1 or (M < 4 and M * N * K < 20 << 20):
            return _gemv(8, 1024, waves=8, pipe=2)
        return _gemm(16, 32, group_m=1, stages=4, waves=4) if M <= 16 else dict(path="dequant")
    if M <= 2:
        return _gemv(16, 512, warps=4, waves=4) if N * K >= 16 << 20 else _gemv(16, 1024, warps=8, waves=4)
    return _gemm(16, 128, group_m=1, stages=4) if M <= 16 else dict(path="dequant")


_SM_COUNT: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the Triton interpreter on CPU tensors: any small number exercises the split-K path
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def plan_splits(programs: int, k_steps: int, target: int, min_steps: int) -> tuple[int, int]:
    """(splits, steps per split) giving about `target` programs, from shapes alone."""
    splits = max(1, min(-(-target // max(programs, 1)), k_steps // max(min_steps, 1)))
    per = -(-k_steps // splits)
    return -(-k_steps // per), per


def quant_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        bits: int, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """The Triton path of quant_linear on x (M, K); callable directly (tests run it under the Triton interpreter)."""
    M, K = x.shape
    N, _, G = check_packed(qweight, scales, zeros, bits, K)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if qweight.stride(-1) != 1 or scales.stride(-1) != 1 or (zeros is not None and zeros.stride(-1) != 1):
        raise ValueError("qweight, scales and zeros must be contiguous along their last dimension")
    cfg = config or quant_config(M, N, K, bits)
    if cfg["path"] == "dequant":
        return F.linear(x, dequantize_triton(qweight, scales, zeros, bits, x.dtype), bias)
    gemv = cfg["path"] == "gemv"
    if bits == 4:
        step = cfg["BLOCK_K"] if gemv else G
        if step % G:
            raise ValueError(f"int4 BLOCK_K={step} must be a multiple of the group size {G}")
    else:
        step = cfg["BLOCK_K"]
    k_steps = triton.cdiv(K, step)
    n_tiles = triton.cdiv(N, cfg["BLOCK_N"])
    tiles = M * n_tiles if gemv else triton.cdiv(M, cfg["BLOCK_M"]) * n_tiles
    splits, per = plan_splits(tiles, k_steps, cfg["waves"] * sm_count(x.device), cfg["MIN_STEPS"])
    partial = splits > 1
    dst = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if partial else out
    z = zeros if zeros is not None else scales  # never read without HAS_Z
    # int8 ignores GROUP (one group a row): 0 keeps one compiled kernel for every K
    common = dict(BITS=bits, GROUP=G if bits == 4 else 0, HAS_Z=zeros is not None, HAS_BIAS=bias is not None,
                  PARTIAL=partial, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    args = (x, qweight, scales, z, bias if bias is not None else scales, dst)
    strides = (x.stride(0), qweight.stride(0), scales.stride(0), z.stride(0), dst.stride(-2),
               dst.stride(0) if partial else 0)
    if gemv:
        _qgemv_kernel[(M, triton.cdiv(N, cfg["BLOCK_N"]), splits)](*args, N, K, per, *strides,
                                                                   PIPE=cfg.get("PIPE", 1), **common)
    else:
        _qgemm_kernel[(tiles, splits)](*args, M, N, K, per, *strides, BLOCK_M=cfg["BLOCK_M"], STEP=step,
                                       GROUP_M=cfg["GROUP_M"], num_stages=cfg["num_stages"], **common)
    return splitk_reduce(dst, bias, x.dtype) if partial else out


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int, bias: torch.Tensor | None = None, *, config: dict | None = None) -> torch.Tensor:
    """Dispatch: a Triton kernel that dequantizes inside the K loop on CUDA (bf16/fp16), the reference elsewhere.

    x (..., K) -> (..., N). `config` overrides the tile config (see quant_config), for tuning.
    """
    if not (HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return quant_linear_ref(x, qweight, scales, zeros, bits, bias)
    if bits == 4 and qweight.shape[-1] * 2 // scales.shape[-1] not in (32, 64, 128, 256):
        return quant_linear_ref(x, qweight, scales, zeros, bits, bias)  # the kernels step whole power-of-two groups
    shape = x.shape
    y = quant_linear_triton(x.reshape(-1, shape[-1]), qweight, scales, zeros, bits, bias, config)
    return y.view(*shape[:-1], y.shape[-1])
