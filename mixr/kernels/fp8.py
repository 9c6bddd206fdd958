"""DeepSeek-V3 FP8 linear: float8_e4m3fn weights with one float32 scale per (128, 128) block, times activations
quantized per token and per 128-channel group, as DeepSeek's inference/kernel.py does.

    W[n, k] = weight[n, k] * scale_inv[n // bn, k // bk]          (bn, bk) = block; edge blocks may be partial
    x[m, k] ~ xq[m, k] * xs[m, k // bk],   xs = amax(|x[m, group]|) / 448,  xq = e4m3(x / xs)   (act_quant)
    y = x @ W^T, accumulated in fp32 with both scales applied once per K block:
        y[m, n] = sum_kb (xq[m, kb] . weight[n, kb]) * xs[m, kb] * scale_inv[n // bn, kb]

CUDA path (Triton, capability 8.9+: Ada/Hopper FP8 tensor cores): fp8 x fp8 tl.dot per K block. Small M
quantizes the activation tile inside the GEMM (no separate pass: every column tile redoes it, which costs little
next to the weight reads) and splits K until the GPU is full, with the fp32 partials summed by
quant_gemm's reduce kernel; large M runs `act_quant` once and then the GEMM. No host sync.
`fp8_block_linear_ref` dequantizes the weight to x's dtype and runs F.linear: the Triton path differs from it by
the activation rounding (e4m3 keeps 3 mantissa bits), about 2-3% relative error on random inputs.
"""

import torch
import torch.nn.functional as F

from mixr.kernels.quant_gemm import plan_splits, sm_count, splitk_reduce

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

HAS_TRITON = triton is not None
FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_EPS = 1e-10  # an all-zero group gets this amax instead of a zero scale (which would make 0/0)


def _check(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
           ) -> tuple[int, int, int]:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"expected x (M, K) and weight (N, K); got {tuple(x.shape)}, {tuple(weight.shape)}")
    M, K = x.shape
    N, K2 = weight.shape
    bn, bk = block
    if K2 != K:
        raise ValueError(f"weight {tuple(weight.shape)} does not take x's K={K} input features")
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight must be float8_e4m3fn, got {weight.dtype}")
    if tuple(scale_inv.shape) != (-(-N // bn), -(-K // bk)) or scale_inv.dtype != torch.float32:
        raise ValueError(f"scale_inv must be float32 ({-(-N // bn)}, {-(-K // bk)}) for a {N}x{K} weight in "
                         f"{bn}x{bk} blocks; got {scale_inv.dtype} {tuple(scale_inv.shape)}")
    if not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise TypeError(f"x must be a floating activation (bf16/fp16/fp32), got {x.dtype}")
    devices = {t.device for t in (x, weight, scale_inv)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    return M, N, K


def dequantize_weight(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    N, K = weight.shape
    s = scale_inv.repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return (weight.float() * s).to(dtype)


def fp8_block_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """x (M, K) @ dequantized weight^T -> (M, N) in x's dtype (the weight rounded to x's dtype first)."""
    _check(x, weight, scale_inv, block)
    return F.linear(x, dequantize_weight(weight, scale_inv, block, x.dtype))


def act_quant_ref(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (e4m3 (M, K), float32 scales (M, ceil(K / block))): x ~ q * scale per group of `block` channels."""
    M, K = x.shape
    groups = -(-K // block)
    xf = F.pad(x.float(), (0, groups * block - K)).view(M, groups, block)
    s = xf.abs().amax(-1).clamp_min(AMAX_EPS) / FP8_MAX  # (M, groups)
    q = (xf / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(M, groups * block)[:, :K], s


if HAS_TRITON:

    @triton.jit
    def _act_quant_kernel(x_ptr, y_ptr, s_ptr, K, stride_xm, stride_ym, stride_sm, BLOCK: tl.constexpr):
        m = tl.program_id(0)
        g = tl.program_id(1)
        offs = g * BLOCK + tl.arange(0, BLOCK)
        mask = offs < K
        x = tl.load(x_ptr + m * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.maximum(tl.max(tl.abs(x), 0), 1e-10) / 448.0
        tl.store(y_ptr + m * stride_ym + offs, (x / s).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + m * stride_sm + g, s)

    @triton.jit(do_not_specialize=["M", "steps_per_split"])
    def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K, steps_per_split,
                         stride_am, stride_asm, stride_bn, stride_bsn, stride_cm, stride_cs,
                         W_BLOCK_N: tl.constexpr,  # weight block rows (bn): row n's scale is in block row n // bn
                         FUSE_ACT: tl.constexpr,   # A is the bf16/fp16/fp32 activation: quantize each tile here
                         PARTIAL: tl.constexpr,    # write fp32 partials (splits, M, N) for the split-K reduce
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # BLOCK_K is the weight's (and the activation's) K block, so each step sees one scale per row and column.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_m
        pid_n = (pid % in_group) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (offs_n % N).to(tl.int64)  # wrapped, not masked: dropped at the store
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        b_cols = b_ptr + rows[None, :] * stride_bn
        bs_rows = bs_ptr + (rows // W_BLOCK_N) * stride_bsn
        # a multiple of the constexpr BLOCK_K, so the compiler knows the loads are aligned (16-byte vectors)
        k_start = split * steps_per_split * BLOCK_K
        k_end = tl.minimum(k_start + steps_per_split * BLOCK_K, K)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < K
            if FUSE_ACT:  # act_quant of this (BLOCK_M, BLOCK_K) tile, as _act_quant_kernel computes it
                a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                a_s = tl.maximum(tl.max(tl.abs(a), 1), 1e-10) / 448.0
                a = (a / a_s[:, None]).to(b_ptr.dtype.element_ty)
            else:
                a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                a_s = tl.load(as_ptr + offs_m * stride_asm + k0 // BLOCK_K, mask=m_mask, other=0.0)
            b = tl.load(b_cols + k[:, None], mask=k_mask[:, None], other=0.0)  # (BLOCK_K, BLOCK_N) e4m3
            b_s = tl.load(bs_rows + k0 // BLOCK_K)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        o_mask = m_mask[:, None] & (offs_n < N)[None, :]
        if PARTIAL:
            tl.store(c_ptr + split * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :], acc, mask=o_mask)
        else:
            tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
                     mask=o_mask)


def act_quant_triton(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, triton.cdiv(K, block), dtype=torch.float32, device=x.device)
    if M:
        _act_quant_kernel[(M, s.shape[1])](x, y, s, K, x.stride(0), y.stride(0), s.stride(0), BLOCK=block,
                                           num_warps=1 if block <= 256 else 4)
    return y, s


def act_quant(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, per `block`-channel group e4m3 quantization: x (M, K) -> (q (M, K) e4m3, scales (M, ceil(K/block))
    float32), x ~ q * scale. Triton on CUDA (block a power of two), the reference elsewhere."""
    if x.dim() != 2:
        raise ValueError(f"expected x (M, K), got {tuple(x.shape)}")
    if HAS_TRITON and x.is_cuda and block & (block - 1) == 0:
        return act_quant_triton(x, block)
    return act_quant_ref(x, block)


# Tiles by M: the first entry whose max_M >= M. FUSE_ACT quantizes activations inside the GEMM; K is split until
# there are about `waves` x (multiprocessors) programs, at least MIN_STEPS K blocks per split.
# bench/bench_quant_kernels.py times these against bf16 on V2-Lite / V3 shapes.
FP8_CONFIGS = [
    (16, dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4, FUSE_ACT=True, waves=2, MIN_STEPS=2)),
    (64, dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4, FUSE_ACT=True, waves=2, MIN_STEPS=2)),
    (1 << 62, dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3, FUSE_ACT=False, waves=1,
                   MIN_STEPS=1 << 30)),
]


def fp8_config(M: int) -> dict:
    return next(cfg for max_m, cfg in FP8_CONFIGS if M <= max_m)


def fp8_block_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                            block: tuple[int, int] = (128, 128), config: dict | None = None) -> torch.Tensor:
    """The Triton path of fp8_block_linear; callable directly (tests run it under the Triton interpreter)."""
    M, N, K = _check(x, weight, scale_inv, block)
    bn, bk = block
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    if bk < 32 or bk & (bk - 1):
        raise ValueError(f"the FP8 kernel needs a power-of-two K block of at least 32, got {bk}")
    if weight.stride(1) != 1:
        raise ValueError("weight must be contiguous along K")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or fp8_config(M)
    if cfg["FUSE_ACT"]:
        a, a_s = x, scale_inv  # a_s unused
    else:
        a, a_s = act_quant_triton(x, bk)
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    splits, per = plan_splits(tiles, triton.cdiv(K, bk), cfg["waves"] * sm_count(x.device), cfg["MIN_STEPS"])
    partial = splits > 1
    dst = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if partial else out
    _fp8_gemm_kernel[(tiles, splits)](
        a, a_s, weight, scale_inv, dst, M, N, K, per,
        a.stride(0), a_s.stride(0), weight.stride(0), scale_inv.stride(0), dst.stride(-2),
        dst.stride(0) if partial else 0,
        W_BLOCK_N=bn, FUSE_ACT=cfg["FUSE_ACT"], PARTIAL=partial, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=bk, GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return splitk_reduce(dst, None, x.dtype) if partial else out


def _fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int] = (128, 128), *, config: dict | None = None) -> torch.Tensor:
    """x (M, K) @ W^T for an e4m3 weight (N, K) with float32 block scales scale_inv (ceil(N/bn), ceil(K/bk))
    -> (M, N) in x's dtype.

    On CUDA with Triton and FP8 tensor cores (capability 8.9+) the activations are quantized per token and per
    K block (act_quant) and multiplied in fp8; otherwise `fp8_block_linear_ref` (weight dequantized, x unrounded).
    `config` overrides fp8_config (tuning).
    """
    _check(x, weight, scale_inv, block)
    if not (HAS_TRITON and _fp8_tensor_cores(x.device) and block[1] >= 32 and block[1] & (block[1] - 1) == 0):
        return fp8_block_linear_ref(x, weight, scale_inv, block)
    return fp8_block_linear_triton(x, weight, scale_inv, block, config)
