"""Skinny GEMM for decode: y = x @ W^T (+ b) for at most 8 rows of x in bf16/fp16, streaming the weight once.

At batch 1-8 a dense linear is a read of its weight; cuBLAS picks kernels for these shapes that reach about half of
HBM bandwidth on an H100. The kernel here gives each program BLOCK_N weight rows and loops over K, so every weight
byte is loaded once, unmasked (the row index wraps instead: the extra rows are dropped at the store) and in
16-byte vectors, and reduces the tile against all rows of x in fp32, rounding once at the end:
  FMA (1-2 rows): the tile is reduced against each row by FMAs and a warp reduction; the next tile is loaded
      before the current one is used (a register double buffer), so a load is always in flight per program.
  DOT (3-8 rows): x is padded to 16 rows and the tile goes through tl.dot (tensor cores), whose loads Triton
      pipelines through shared memory; past a few rows the FMA path's per-row reductions would cost more than
      the memory time.
When N / BLOCK_N programs are too few to fill the multiprocessors, K is split and the fp32 partials are summed
(with the bias) by quant_gemm's reduce kernel. `skinny_gate_up` runs two weights in one kernel and writes
silu(x Wg^T) * (x Wu^T), a SwiGLU MLP's first half in one launch (no split-K there: the epilogue is nonlinear).

`install_skinny(model)` switches plain nn.Linear and GatedMLP modules to subclasses whose forward takes these
kernels for the row counts where they were measured faster than cuBLAS on this GPU at install time; everything
else (CPU, float32, autograd, more rows) runs the original PyTorch code. Parameters and state_dict are unchanged.
No host sync anywhere: CUDA-graph capturable.
"""

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mixr.kernels.quant_gemm import HAS_TRITON, plan_splits, sm_count, splitk_reduce
from mixr.kernels.timing import graph_ms
from mixr.layers.mlp import GatedMLP

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_ROWS = 8
BUCKETS = (1, 2, 4, 8)  # row counts are rounded up to these (the FMA path's compiled variants; the decode graphs)


def bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


def skinny_gate_up_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """silu(x @ w_gate^T) * (x @ w_up^T), as GatedMLP computes it."""
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


if HAS_TRITON:

    @triton.jit
    def _fma_step(acc, acc2, w, w2, x_ptr, stride_xm, M, k, K, ROWS: tl.constexpr, GATE_UP: tl.constexpr,
                  TAIL: tl.constexpr):
        # acc[:, m] (+ acc2[:, m]) += w (w2) (BN, BK) . x[m, k] for each row m: the tile stays in registers and is
        # reduced right away per row (2-D accumulators would cost ROWS x the tile's registers).
        # acc is (BN, ROWS) so that a row's (BN,) sum lands in it without a layout change.
        cols = tl.arange(0, ROWS)[None, :]
        wf = w.to(tl.float32)
        w2f = w2.to(tl.float32)
        for m in tl.static_range(ROWS):
            if TAIL:
                xm = tl.load(x_ptr + m * stride_xm + k, mask=(k < K) & (m < M), other=0.0)
            else:  # a mask constant along k keeps the load vectorised
                xm = tl.load(x_ptr + m * stride_xm + k, mask=m < M, other=0.0)
            xm = xm.to(tl.float32)[None, :]
            acc += tl.where(cols == m, tl.sum(wf * xm, 1)[:, None], 0.0)
            if GATE_UP:
                acc2 += tl.where(cols == m, tl.sum(w2f * xm, 1)[:, None], 0.0)
        return acc, acc2

    @triton.jit
    def _dot_step(acc, acc2, w, w2, x_ptr, stride_xm, M, k, K, ROWS: tl.constexpr, GATE_UP: tl.constexpr,
                  TAIL: tl.constexpr):
        # acc (BN, 16) += w (BN, BK) @ x[:16, k]^T, rows past M read as zeros
        offs_m = tl.arange(0, ROWS)
        mask = (offs_m < M)[None, :]
        if TAIL:
            mask = mask & (k < K)[:, None]
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=mask, other=0.0)  # (BK, 16)
        acc = tl.dot(w, xt, acc)
        if GATE_UP:
            acc2 = tl.dot(w2, xt, acc2)
        return acc, acc2

    @triton.jit(do_not_specialize=["M", "steps_per_split"])
    def _skinny_kernel(x_ptr, w_ptr, w2_ptr, b_ptr, out_ptr, M, N, K, steps_per_split,
                       stride_xm, stride_wn, stride_om, stride_os,
                       ROWS: tl.constexpr, GATE_UP: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                       DOT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # out[m, n] = sum_k x[m, k] W[n, k] over this program's n tile and K split (GATE_UP: silu(. Wg) * (. Wu)).
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (offs_n % N).to(tl.int64)  # wrapped, not masked (see the module docstring)
        offs_k = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None] * stride_wn + offs_k[None, :]
        w2_ptrs = w2_ptr + rows[:, None] * stride_wn + offs_k[None, :]
        # Whole BLOCK_K tiles [t0, t1) with no K mask (a mask varying along K makes 2-byte loads), then the one
        # partial tile, if any, in the split that covers it. Tile offsets are t * BLOCK_K, so the compiler knows
        # their alignment. The wrapper guarantees K >= BLOCK_K, so full >= 1.
        full = K // BLOCK_K
        t0 = split * steps_per_split
        t1 = tl.minimum(t0 + steps_per_split, full)
        acc = tl.zeros((BLOCK_N, ROWS), tl.float32)
        acc2 = tl.zeros((BLOCK_N, ROWS), tl.float32)  # GATE_UP's up projection; dead code otherwise
        if DOT:
            for t in range(t0, t1):
                w = tl.load(w_ptrs + t * BLOCK_K)
                w2 = tl.load(w2_ptrs + t * BLOCK_K) if GATE_UP else w
                acc, acc2 = _dot_step(acc, acc2, w, w2, x_ptr, stride_xm, M, t * BLOCK_K + offs_k, K,
                                      ROWS, GATE_UP, False)
        else:
            # Register double buffer: load tile t + 1 before reducing tile t. The prefetch index is clamped to
            # this split's last tile (a re-read from L1/L2), never the next split's (an extra HBM read).
            tp = tl.minimum(t0, t1 - 1)
            w = tl.load(w_ptrs + tp * BLOCK_K)
            w2 = tl.load(w2_ptrs + tp * BLOCK_K) if GATE_UP else w
            for t in range(t0, t1):
                nxt = tl.minimum(t + 1, t1 - 1) * BLOCK_K
                w_next = tl.load(w_ptrs + nxt)
                w2_next = tl.load(w2_ptrs + nxt) if GATE_UP else w_next
                acc, acc2 = _fma_step(acc, acc2, w, w2, x_ptr, stride_xm, M, t * BLOCK_K + offs_k, K,
                                      ROWS, GATE_UP, False)
                w, w2 = w_next, w2_next
        if not EVEN_K:
            if t0 + steps_per_split > full:
                k_mask = (full * BLOCK_K + offs_k < K)[None, :]
                w = tl.load(w_ptrs + full * BLOCK_K, mask=k_mask, other=0.0)
                w2 = tl.load(w2_ptrs + full * BLOCK_K, mask=k_mask, other=0.0) if GATE_UP else w
                if DOT:
                    acc, acc2 = _dot_step(acc, acc2, w, w2, x_ptr, stride_xm, M, full * BLOCK_K + offs_k, K,
                                          ROWS, GATE_UP, True)
                else:
                    acc, acc2 = _fma_step(acc, acc2, w, w2, x_ptr, stride_xm, M, full * BLOCK_K + offs_k, K,
                                          ROWS, GATE_UP, True)
        offs_m = tl.arange(0, ROWS)
        o_off = offs_m[None, :] * stride_om + offs_n[:, None]  # (BN, ROWS): out is (M, N) row-major
        o_mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
        if PARTIAL:  # fp32 partials (splits, M, N); splitk_reduce adds the bias
            tl.store(out_ptr + split * stride_os + o_off, acc, mask=o_mask)
        else:
            if GATE_UP:
                acc = acc * tl.sigmoid(acc) * acc2
            if HAS_BIAS:
                acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
            tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# Tile configs, a rule on (M, N, K) rather than a table (not yet tuned on a GPU; bench/bench_gemv.py --sweep).
# FMA (rows 1-2): BLOCK_N weight rows (8; gate_up 4 per weight, as the routed-expert GEMV in fused_moe) x BLOCK_K
#   columns a step: 512 when it divides K, else 256 (K = 2816 = 11 x 256), so most shapes need no tail tile;
#   8 x 512 bf16 is 8 KB a step, 16 KB in flight per program with the prefetch.
# DOT (rows 3-8): 32 x 128 tiles (gate_up 16, tl.dot's minimum), 4 pipeline stages.
# Split-K (linear only): when the n tiles are fewer than the multiprocessors, K is split so that there are about
#   twice as many programs as multiprocessors, at least MIN_STEPS tiles each. Enough tiles run unsplit: the split
#   costs a second launch and a pass over the partials, which is a good share of a 3-5 us GEMV.
FMA_MAX_ROWS = 2


def skinny_config(M: int, N: int, K: int, gate_up: bool = False) -> dict:
    cap = 1 << max(K.bit_length() - 1, 4)  # BLOCK_K <= K (the kernel needs one whole tile), >= 16
    if M <= FMA_MAX_ROWS:
        bk = 512 if K % 512 == 0 else 256
        return dict(DOT=False, BLOCK_N=4 if gate_up else 8, BLOCK_K=min(bk, cap), num_warps=4, num_stages=None,
                    waves=2, MIN_STEPS=1, splits=None)
    return dict(DOT=True, BLOCK_N=16 if gate_up else 32, BLOCK_K=min(128, cap), num_warps=4, num_stages=4,
                waves=2, MIN_STEPS=2, splits=None)


def split_plan(N: int, K: int, cfg: dict, sms: int, gate_up: bool = False) -> tuple[int, int]:
    """(K splits, BLOCK_K tiles per split) for an (N, K) weight: see the rule above; cfg["splits"] forces one."""
    tiles, k_steps = -(-N // cfg["BLOCK_N"]), -(-K // cfg["BLOCK_K"])
    if gate_up or (not cfg.get("splits") and tiles >= sms):
        return 1, k_steps
    if cfg.get("splits"):
        per = -(-k_steps // cfg["splits"])
        return -(-k_steps // per), per
    return plan_splits(tiles, k_steps, cfg["waves"] * sms, cfg["MIN_STEPS"])


def _launch(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, bias: torch.Tensor | None,
            config: dict | None) -> torch.Tensor:
    """The Triton path on x (M, K), M <= 8: x @ w^T + bias, or silu(x @ w^T) * (x @ w2^T) with w2.
    Callable directly (tests run it under the Triton interpreter); `config` overrides skinny_config, and its
    `splits` forces a K split (linear only)."""
    M, K = x.shape
    N = w.shape[0]
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"skinny kernels take 1..{MAX_ROWS} rows, got {M}")
    if w.dim() != 2 or w.shape[1] != K or w.stride(1) != 1:
        raise ValueError(f"weight {tuple(w.shape)} must be (N, {K}) and contiguous along K")
    if w2 is not None and (w2.shape != w.shape or w2.stride() != w.stride()):
        raise ValueError(f"gate and up weights must have the same shape and strides: {tuple(w.shape)} vs "
                         f"{tuple(w2.shape)}")
    cfg = config or skinny_config(M, N, K, gate_up=w2 is not None)
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    if bk > K or bk < 16:
        raise ValueError(f"BLOCK_K={bk} must be in 16..K={K}")
    if x.stride(1) != 1:
        x = x.contiguous()
    tiles = triton.cdiv(N, bn)
    splits, per = split_plan(N, K, cfg, sm_count(x.device), gate_up=w2 is not None)
    partial = splits > 1
    dst = (torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if partial
           else torch.empty(M, N, dtype=x.dtype, device=x.device))
    extra = {} if cfg.get("num_stages") is None else dict(num_stages=cfg["num_stages"])
    _skinny_kernel[(tiles, splits)](
        x, w, w2 if w2 is not None else w, bias if bias is not None else w, dst, M, N, K, per,
        x.stride(0), w.stride(0), dst.stride(-2), dst.stride(0) if partial else 0,
        ROWS=16 if cfg["DOT"] else bucket(M), GATE_UP=w2 is not None, HAS_BIAS=bias is not None, PARTIAL=partial,
        DOT=cfg["DOT"], EVEN_K=K % bk == 0, BLOCK_N=bn, BLOCK_K=bk, num_warps=cfg["num_warps"], **extra)
    return splitk_reduce(dst, bias, x.dtype) if partial else dst


def _triton_ok(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether the kernels can serve x (..., K) with these weights/bias: CUDA, bf16/fp16 throughout, 1..8 rows,
    K >= 16, weights contiguous along K, and no autograd (the kernels have no backward)."""
    if not (HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    K = x.shape[-1]
    if K < 16 or not 1 <= x.numel() // K <= MAX_ROWS:
        return False
    ps = [p for p in params if p is not None]
    if any(p.dtype != x.dtype or p.device != x.device or p.stride(-1) != 1 for p in ps):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in ps)))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: dict | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., K) of at most 8 rows: the Triton kernel on CUDA in bf16/fp16 (fp32
    accumulation, one rounding), F.linear otherwise (CPU, float32, autograd, more rows)."""
    if not _triton_ok(x, weight, bias):
        return F.linear(x, weight, bias)
    shape = x.shape
    y = _launch(x.reshape(-1, shape[-1]), weight, None, bias, config)
    return y.view(*shape[:-1], weight.shape[0])


def skinny_gate_up(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *,
                   config: dict | None = None) -> torch.Tensor:
    """silu(x @ w_gate^T) * (x @ w_up^T) for x (..., K) of at most 8 rows, in one kernel on CUDA in bf16/fp16
    (fp32 throughout, one rounding); skinny_gate_up_ref otherwise."""
    if not _triton_ok(x, w_gate, w_up):
        return skinny_gate_up_ref(x, w_gate, w_up)
    shape = x.shape
    y = _launch(x.reshape(-1, shape[-1]), w_gate, w_up, None, config)
    return y.view(*shape[:-1], w_gate.shape[0])


# ---------------------------------------------------------------------------------------------- the module switch
class SkinnyLinear(nn.Linear):
    """nn.Linear whose forward takes skinny_linear for the row buckets in `skinny_rows` (set by install_skinny)."""

    skinny_rows: frozenset = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bucket(x.numel() // max(x.shape[-1], 1)) in self.skinny_rows:
            return skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class SkinnyGatedMLP(GatedMLP):
    """GatedMLP whose gate and up projections run as one skinny_gate_up kernel for the row buckets in
    `skinny_rows`: 2 launches (gate_up, down) instead of 5 (gate, up, silu, mul, down)."""

    skinny_rows: frozenset = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bucket(x.numel() // max(x.shape[-1], 1)) in self.skinny_rows:
            return self.down_proj(skinny_gate_up(x, self.gate_proj.weight, self.up_proj.weight))
        return super().forward(x)


def _graph_us(fn, args: list[tuple]) -> float:
    """Median GPU microseconds per call of fn(*a) over the argument tuples (20 replays a batch, 3 batches)."""
    return graph_ms([lambda a=a: fn(*a) for a in args], reps=20, batches=3) * 1e3


def _copies(weights: tuple[torch.Tensor, ...], spare_bytes: int = 512 << 20) -> list[tuple[torch.Tensor, ...]]:
    """The weights and clones of them, enough that one pass over all exceeds twice the L2 cache (consecutive
    layers of a model do not find each other's weights in L2 either), within spare_bytes of extra memory."""
    size = sum(w.numel() * w.element_size() for w in weights)
    l2 = torch.cuda.get_device_properties(weights[0].device).L2_cache_size
    n = max(1, min(math.ceil(2 * l2 / size), 1 + spare_bytes // size, 32))
    return [weights] + [tuple(w.clone() for w in weights) for _ in range(n - 1)]


def _measure(kind: str, weights: tuple[torch.Tensor, ...], rows: tuple[int, ...]) -> dict[int, tuple[float, float]]:
    """{rows: (PyTorch us, skinny us)} for one shape, on its device, at the given row counts."""
    ws = _copies(weights)
    K = weights[0].shape[1]
    out = {}
    for m in rows:
        x = torch.randn(m, K, dtype=weights[0].dtype, device=weights[0].device)
        if kind == "linear":
            ref = _graph_us(lambda w, x=x: F.linear(x, w), ws)
            fast = _graph_us(lambda w, x=x: _launch(x, w, None, None, None), ws)
        else:
            ref = _graph_us(lambda wg, wu, x=x: skinny_gate_up_ref(x, wg, wu), ws)
            fast = _graph_us(lambda wg, wu, x=x: _launch(x, wg, wu, None, None), ws)
        out[m] = (ref, fast)
    return out


def _eligible(m: nn.Module) -> str | None:
    """'linear' / 'gate_up' for the plain modules install_skinny may switch (never QuantLinear, Fp8Linear or the
    LoRA wrappers: those are other classes), None otherwise."""
    if type(m) is nn.Linear:
        return "linear"
    if type(m) is GatedMLP and type(m.gate_proj) is nn.Linear and type(m.up_proj) is nn.Linear \
            and m.gate_proj.bias is None and m.up_proj.bias is None:
        return "gate_up"
    return None


@torch.no_grad()
def install_skinny(model: nn.Module, *, rows: tuple[int, ...] = BUCKETS, min_speedup: float = 1.05,
                   measure: bool = True, report: dict | None = None) -> int:
    """Switch plain nn.Linear modules to SkinnyLinear and GatedMLPs to SkinnyGatedMLP (in place, `__class__` only:
    parameters, names and state_dict unchanged) where the skinny kernels are faster. Returns the number switched.

    measure=True: each distinct (kind, N, K, dtype) whose weights the kernels can run (CUDA, bf16/fp16, K >= 16)
    is timed at each row bucket in `rows` (CUDA graphs, weights cloned past L2) against the PyTorch path (F.linear;
    gate_up: gate, up, silu, mul); a bucket takes the kernel where it is at least `min_speedup` x faster, and
    modules with no such bucket stay as they are. Install after the model is on its device and dtype, before CUDA
    graphs are captured. `report`, if given, receives {"<kind> NxK <dtype>": {"modules", "skinny_rows",
    "us": {rows: {"torch", "skinny"}}}}.
    measure=False: every plain module is switched with every bucket on, untimed (tests; forcing the kernels).
    Either way the forward falls back to the original code wherever the kernels cannot run (CPU, float32,
    autograd, more than 8 rows). `uninstall_skinny` switches back (add_lora wants plain nn.Linear targets).
    """
    if not set(rows) <= set(BUCKETS):
        raise ValueError(f"rows must be among the buckets {BUCKETS}, got {rows}")
    found: dict[tuple, list[nn.Module]] = {}
    for m in model.modules():
        kind = _eligible(m)
        if kind is None:
            continue
        w = m.weight if kind == "linear" else m.gate_proj.weight
        ok = HAS_TRITON and w.is_cuda and w.dtype in (torch.bfloat16, torch.float16) and w.shape[1] >= 16 \
            and w.stride(1) == 1 and (kind == "linear" or m.up_proj.weight.stride() == w.stride())
        if measure and not ok:
            continue
        found.setdefault((kind, *w.shape, w.dtype, w.device), []).append(m)
    switched = 0
    for (kind, N, K, dtype, device), mods in found.items():
        if measure:
            first = mods[0]
            weights = (first.weight,) if kind == "linear" else (first.gate_proj.weight, first.up_proj.weight)
            try:
                us = _measure(kind, weights, rows)
            except Exception as e:  # a kernel that fails to build or run on this GPU: keep PyTorch's path, say so
                warnings.warn(f"skinny {kind} {N}x{K} left on PyTorch: {e}")
                continue
            fast = frozenset(r for r, (ref, sk) in us.items() if sk * min_speedup <= ref)
            if report is not None:
                report[f"{kind} {N}x{K} {str(dtype).removeprefix('torch.')}"] = dict(
                    modules=len(mods), skinny_rows=sorted(fast),
                    us={r: dict(torch=round(ref, 2), skinny=round(sk, 2)) for r, (ref, sk) in us.items()})
        else:
            fast = frozenset(BUCKETS)
        if not fast:
            continue
        for m in mods:
            m.__class__ = SkinnyLinear if kind == "linear" else SkinnyGatedMLP
            m.skinny_rows = fast
            switched += 1
    return switched


def uninstall_skinny(model: nn.Module) -> int:
    """Switch every SkinnyLinear / SkinnyGatedMLP back to nn.Linear / GatedMLP; returns how many."""
    n = 0
    for m in model.modules():
        if type(m) in (SkinnyLinear, SkinnyGatedMLP):
            m.__class__ = nn.Linear if type(m) is SkinnyLinear else GatedMLP
            del m.skinny_rows
            n += 1
    return n
