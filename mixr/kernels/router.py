"""The MoE router, from hidden states to expert ids and weights, in one kernel at decode sizes.

The math is mixr.layers.moe.Router's (and `route_ref`'s):
    logits  = x @ W^T in float32                                                    (T, E)
    scores  = softmax(logits) or sigmoid(logits)
    choice  = scores + e_score_correction_bias (if any)
    grouped methods (n_group > 1): rank groups by their best choice (group_limited_greedy) or the sum of their two
            best (noaux_tc), keep the topk_group best groups, mask the rest (0 for group_limited_greedy, -inf for
            noaux_tc)
    ids     = top_k of choice; weights = scores[ids], renormalised when norm_topk_prob (and top_k > 1), times
              routed_scaling_factor
Ties are broken toward the lower expert (or group) index; torch.topk leaves that order unspecified, so only tied
inputs can differ. Ids come out in descending order of choice, as topk gives them.

CUDA path (Triton; no autograd; no host sync, so CUDA graphs capture it), one kernel for up to GEMV_MAX_T tokens:
  program (token, block of experts) computes its logits as a GEMV that reads W in its own dtype and sums in
  float32, stores them, and counts itself in on a per-token arrival counter; the last program of a token to
  arrive reads the token's whole logits row back and does the selection: scores, groups, top-k by repeated argmax
  (k is small), weights; then it zeroes the counter for the next launch. (The counters are
  mixr.kernels.arrivals' persistent buffer.)
  Past GEMV_MAX_T tokens (prefill) the logits are a float32 cuBLAS GEMM, as in the PyTorch path, and a second
  kernel selects.
Only RouterOptions fields this file knows are supported; a router with any other option set (the dynamic expert
count, say) takes the PyTorch path: see `can_fuse_route`.
"""

import dataclasses

import torch
import torch.nn.functional as F

from mixr.kernels.arrivals import arrival_counters
from mixr.kernels.norm import triton_inference as _use_triton  # a module attribute: tests patch it per module

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

HAS_TRITON = triton is not None
GEMV_MAX_T = 64  # each GEMV program reads a slice of W per token: past this a GEMM reads W once for all tokens
# The GEMV tile: columns of W a program loads per step, and warps (for the GEMV and the last program's selection).
# On an H100 at batch 1 (bench/tune_router.py): 3.9 us a call at DeepSeek-V2-Lite's shape (4.9 with 4 warps), 8.3 at
# DeepSeek-V3's (8.1 with 4).
ROUTER_TILE = {"BLOCK_K": 512, "num_warps": 1}
MAX_EXPERTS = 1024  # the select kernel holds a token's scores in registers
_KNOWN = {"num_experts", "top_k", "scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob",
          "routed_scaling_factor", "correction_bias"}


def _only_known_options(opts) -> bool:
    """True when every RouterOptions field outside _KNOWN holds its default: options added later (which these
    kernels do not implement) must send the router down the PyTorch path, not be ignored."""
    for f in dataclasses.fields(opts):
        if f.name in _KNOWN:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        if getattr(opts, f.name) != default:
            return False
    return True


def can_fuse_route(x: torch.Tensor, weight: torch.Tensor, opts) -> bool:
    """Whether `fused_route` runs the kernels for this router and input (else the caller's PyTorch code should)."""
    return (x.dim() == 2 and _use_triton(x, weight) and x.shape[1] == weight.shape[1]
            and opts.num_experts <= MAX_EXPERTS and x.stride(-1) == 1 and weight.stride(-1) == 1
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and weight.dtype in
            (torch.float32, torch.bfloat16, torch.float16) and _only_known_options(opts))


def route_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, opts
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch, the same math as Router.forward without its dynamic options: x (T, H) -> weights (T, k)
    float32, ids (T, k) int64, logits (T, E) float32."""
    logits = F.linear(x.float(), weight.float())
    return (*select_ref(logits, bias, opts), logits)


def choose_experts(scores: torch.Tensor, bias: torch.Tensor | None, opts, k: int) -> torch.Tensor:
    """Scores (T, E) float32 -> the ids (T, k) of the chosen experts: top-k of the (biased) scores, within the
    topk_group best groups for group-limited routing. The bias only picks experts, it never weights them."""
    o = opts
    choice = scores + bias if bias is not None else scores
    if o.topk_method != "greedy" and o.n_group > 1:
        grouped = choice.view(-1, o.n_group, o.num_experts // o.n_group)
        if o.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(o.topk_group, dim=-1).indices, True)
        # noaux_tc masks with -inf (biased scores can be negative); V2 masks softmax scores with 0.
        fill = float("-inf") if o.topk_method == "noaux_tc" else 0.0
        choice = grouped.masked_fill(~keep[..., None], fill).view(-1, o.num_experts)
    return choice.topk(k, dim=-1).indices


def select_ref(logits: torch.Tensor, bias: torch.Tensor | None, opts) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything after the logits (T, E) float32 -> weights (T, k) float32, ids (T, k) int64."""
    o = opts
    scores = logits.softmax(-1) if o.scoring_func == "softmax" else logits.sigmoid()
    ids = choose_experts(scores, bias, o, o.top_k)
    weights = scores.gather(1, ids)
    if o.norm_topk_prob and o.top_k > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * o.routed_scaling_factor, ids


def fused_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, opts
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router.forward for x (T, H), weight (E, H), bias (E,) or None -> weights (T, k) float32, ids (T, k)
    int64, logits (T, E) float32. Runs the kernels when `can_fuse_route`, else `route_ref`."""
    T, H = x.shape
    E = opts.num_experts
    if tuple(weight.shape) != (E, H):
        raise ValueError(f"router weight {tuple(weight.shape)} must be ({E}, {H})")
    if bias is not None and (tuple(bias.shape) != (E,) or not bias.is_floating_point()):
        raise ValueError(f"correction bias {tuple(bias.shape)} {bias.dtype} must be ({E},) floating point")
    if opts.topk_method == "noaux_tc" and opts.n_group > 1 and E // opts.n_group < 2:
        raise ValueError("noaux_tc ranks groups by their two best experts: each group needs at least two")
    if not can_fuse_route(x, weight, opts) or (bias is not None and not _use_triton(bias)):
        return route_ref(x, weight, bias, opts)
    weights = torch.empty(T, opts.top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, opts.top_k, dtype=torch.int64, device=x.device)
    if T == 0:
        return weights, ids, torch.empty(0, E, dtype=torch.float32, device=x.device)
    arrivals = arrival_counters(x.device, T) if T <= GEMV_MAX_T else None
    if arrivals is not None:
        logits = torch.empty(T, E, dtype=torch.float32, device=x.device)
        _launch_router(x, weight, bias, opts, logits, weights, ids, arrivals)
        return weights, ids, logits
    with torch.autocast(x.device.type, enabled=False):  # float32 logits even under autocast, as Router does
        logits = F.linear(x.float(), weight.float())
    _launch_router_select(logits, bias, opts, weights, ids)
    return weights, ids, logits


if HAS_TRITON:
    from mixr.kernels.arrivals import arrive_last

    @triton.jit
    def _select_token(logits_row, bias_ptr, weights_row, ids_row, scale,
                      E: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, G_P2: tl.constexpr, EG_P2: tl.constexpr,
                      TOP_K: tl.constexpr, K_P2: tl.constexpr, TOPK_GROUP: tl.constexpr, SOFTMAX: tl.constexpr,
                      HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, NOAUX: tl.constexpr, NORM: tl.constexpr):
        # A token's E experts as a (group, expert-in-group) tile, so group reductions are row reductions.
        g = tl.arange(0, G_P2)[:, None]
        j = tl.arange(0, EG_P2)[None, :]
        e = g * EG + j
        valid = (g < G) & (j < EG)
        # .cg: from L2, never a stale L1 line (other programs of the fused kernel wrote this row)
        logit = tl.load(logits_row + e, mask=valid, other=float("-inf"), cache_modifier=".cg")
        if SOFTMAX:
            p = tl.exp(logit - tl.max(tl.max(logit, 1), 0))  # padding: exp(-inf) = 0
            scores = p / tl.sum(tl.sum(p, 1), 0)
        else:
            scores = tl.sigmoid(logit)
        choice = scores
        if HAS_BIAS:
            choice += tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, float("-inf"))
        if GROUPED:
            best = tl.max(choice, 1)  # (G_P2,)
            if NOAUX:  # plus the second best: the best again unless it is the row's only maximum
                first = tl.min(tl.where(choice == best[:, None], j, EG_P2), 1)
                best += tl.max(tl.where(j == first[:, None], float("-inf"), choice), 1)
            gi = tl.arange(0, G_P2)
            group_score = tl.where(gi < G, best, float("-inf"))
            keep = gi < 0
            for _ in tl.static_range(TOPK_GROUP):
                m = tl.max(group_score, 0)
                pick = tl.min(tl.where(group_score == m, gi, G_P2), 0)
                keep = keep | (gi == pick)
                group_score = tl.where(gi == pick, float("-inf"), group_score)
            fill = float("-inf") if NOAUX else 0.0
            choice = tl.where(valid, tl.where(keep[:, None], choice, fill), float("-inf"))
        # top-k by repeated argmax; `taken` (not -inf, which masked experts may hold) marks what is chosen
        taken = ~valid
        kk = tl.arange(0, K_P2)
        w_out = tl.zeros((K_P2,), tl.float32)
        for r in tl.static_range(TOP_K):
            m = tl.max(tl.max(tl.where(taken, float("-inf"), choice), 1), 0)
            hit = (choice == m) & ~taken
            idx = tl.min(tl.min(tl.where(hit, e, E), 1), 0)
            w = tl.sum(tl.sum(tl.where(e == idx, scores, 0.0), 1), 0)
            tl.store(ids_row + r, idx.to(tl.int64))
            w_out = tl.where(kk == r, w, w_out)
            taken = taken | (e == idx)
        if NORM:
            w_out = w_out / (tl.sum(w_out, 0) + 1e-20)
        tl.store(weights_row + kk, w_out * scale, mask=kk < TOP_K)

    @triton.jit
    def _router_kernel(x_ptr, w_ptr, logits_ptr, bias_ptr, weights_ptr, ids_ptr, arrivals_ptr, H, scale,
                       stride_xt, stride_we,
                       BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, NUM_EB: tl.constexpr,
                       E: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, G_P2: tl.constexpr, EG_P2: tl.constexpr,
                       TOP_K: tl.constexpr, K_P2: tl.constexpr, TOPK_GROUP: tl.constexpr, SOFTMAX: tl.constexpr,
                       HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, NOAUX: tl.constexpr, NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = e < E
        acc = tl.zeros((BLOCK_E, BLOCK_K), tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + t * stride_xt + k, mask=k < H, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_we + k[None, :],
                        mask=e_mask[:, None] & (k < H)[None, :], other=0.0).to(tl.float32)
            acc += w * xk[None, :]
        tl.store(logits_ptr + t * E + e, tl.sum(acc, 1), mask=e_mask)
        if arrive_last(arrivals_ptr + t, NUM_EB):  # the token's last program selects over all its logits
            _select_token(logits_ptr + t * E, bias_ptr, weights_ptr + t * TOP_K, ids_ptr + t * TOP_K, scale,
                          E, G, EG, G_P2, EG_P2, TOP_K, K_P2, TOPK_GROUP, SOFTMAX, HAS_BIAS, GROUPED, NOAUX, NORM)

    @triton.jit
    def _router_select_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, stride_lt, scale,
                              E: tl.constexpr, G: tl.constexpr, EG: tl.constexpr,
                              G_P2: tl.constexpr, EG_P2: tl.constexpr,
                              TOP_K: tl.constexpr, K_P2: tl.constexpr, TOPK_GROUP: tl.constexpr,
                              SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
                              NOAUX: tl.constexpr, NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        _select_token(logits_ptr + t * stride_lt, bias_ptr, weights_ptr + t * TOP_K, ids_ptr + t * TOP_K, scale,
                      E, G, EG, G_P2, EG_P2, TOP_K, K_P2, TOPK_GROUP, SOFTMAX, HAS_BIAS, GROUPED, NOAUX, NORM)


def _select_constexprs(E: int, opts) -> dict:
    grouped = opts.topk_method != "greedy" and opts.n_group > 1
    G = opts.n_group if grouped else 1
    p2 = triton.next_power_of_2
    return dict(E=E, G=G, EG=E // G, G_P2=p2(G), EG_P2=p2(E // G), TOP_K=opts.top_k, K_P2=p2(opts.top_k),
                TOPK_GROUP=opts.topk_group if grouped else 0, SOFTMAX=opts.scoring_func == "softmax",
                GROUPED=grouped, NOAUX=opts.topk_method == "noaux_tc",
                NORM=bool(opts.norm_topk_prob) and opts.top_k > 1)


def _launch_router(x, weight, bias, opts, logits, weights, ids, arrivals) -> None:
    """x (T, H) -> logits (T, E) contiguous, weights, ids (T, k) contiguous; arrivals: zeroed (>= T,) int32."""
    T, H = x.shape
    E = weight.shape[0]
    # Enough programs to spread the weight read over the GPU at batch 1 (E of them), fewer and wider as T grows.
    block_e = max(1, min(16, triton.next_power_of_2(triton.cdiv(T * E, 256))))
    block_k = min(ROUTER_TILE["BLOCK_K"], triton.next_power_of_2(H))
    num_eb = triton.cdiv(E, block_e)
    _router_kernel[(T, num_eb)](
        x, weight, logits, bias if bias is not None else logits, weights, ids, arrivals, H,
        float(opts.routed_scaling_factor), x.stride(0), weight.stride(0),
        BLOCK_E=block_e, BLOCK_K=block_k, NUM_EB=num_eb, HAS_BIAS=bias is not None, **_select_constexprs(E, opts),
        num_warps=ROUTER_TILE["num_warps"])


def _launch_router_select(logits: torch.Tensor, bias: torch.Tensor | None, opts, weights: torch.Tensor,
                          ids: torch.Tensor) -> None:
    T, E = logits.shape
    _router_select_kernel[(T,)](
        logits, bias if bias is not None else logits, weights, ids, logits.stride(0), float(opts.routed_scaling_factor),
        HAS_BIAS=bias is not None, **_select_constexprs(E, opts), num_warps=1 if E <= 128 else 4)


def _launch_router_ref(x, weight, bias, opts, logits, weights, ids, arrivals) -> None:
    """_launch_router in plain PyTorch (tests, and bench/count_decode_ops.py, stand it in for the kernel)."""
    logits.copy_(F.linear(x.float(), weight.float()))
    _launch_router_select_ref(logits, bias, opts, weights, ids)


def _launch_router_select_ref(logits, bias, opts, weights, ids) -> None:
    """_launch_router_select in plain PyTorch."""
    w, top = select_ref(logits, bias, opts)
    weights.copy_(w)
    ids.copy_(top)
