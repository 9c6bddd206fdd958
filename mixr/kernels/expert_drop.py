"""Dynamic expert count: drop each token's lowest-weighted routing candidates by a top-p or entropy rule.

For one token's K candidates with router weights w (before any normalisation):
    share = w / sum(w); candidates ranked by weight, ties to the lower column
    top_p    n = number of candidates whose higher-ranked ones hold less than p of the share   (p >= 1: n = K)
    entropy  n = ceil(scale * exp(H)),  H = -sum(share * log(share))
    n = clamp(n, k_min, K); candidates ranked n and below get id -1 and weight 0, in place; hist[n] += 1

`expert_drop_ref` is plain PyTorch, about fifteen small ops. On CUDA with Triton `expert_drop` is one kernel (a
program per token): inside a decode CUDA graph every op is a node on the critical path, and fifteen of them per
MoE layer cost more than dropping experts saves at batch 1.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path serves
    triton = None

HAS_TRITON = triton is not None
RULES = ("top_p", "entropy")


def _check(weights: torch.Tensor, ids: torch.Tensor, rule: str, k_min: int, hist: torch.Tensor | None) -> None:
    if weights.dim() != 2 or ids.shape != weights.shape:
        raise ValueError(f"weights and ids must both be (T, K); got {tuple(weights.shape)}, {tuple(ids.shape)}")
    if weights.dtype != torch.float32:
        raise TypeError(f"weights must be float32, got {weights.dtype}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {RULES}")
    if not 1 <= k_min:
        raise ValueError(f"k_min must be >= 1, got {k_min}")
    if hist is not None and (hist.dim() != 1 or hist.numel() < weights.shape[1] + 1 or hist.dtype != torch.int64):
        raise ValueError(f"hist must be int64 with at least K + 1 = {weights.shape[1] + 1} entries")


def expert_drop_ref(weights: torch.Tensor, ids: torch.Tensor, rule: str, value: float, k_min: int = 1,
                    hist: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch expert_drop."""
    _check(weights, ids, rule, k_min, hist)
    K = weights.shape[1]
    by_weight, order = weights.sort(dim=-1, descending=True, stable=True)  # (T, K)
    share = by_weight / by_weight.sum(-1, keepdim=True).clamp_min(1e-20)
    if rule == "top_p":
        n = (share.cumsum(-1) - share < value).sum(-1) if value < 1 else torch.full_like(order[:, 0], K)
    else:
        entropy = -(share * share.clamp_min(1e-20).log()).sum(-1)
        n = torch.ceil(value * entropy.exp()).long()
    n = n.clamp(k_min, K)
    keep_sorted = torch.arange(K, device=weights.device) < n[:, None]
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)  # back to the candidates' columns
    if hist is not None:
        hist.index_add_(0, n, torch.ones_like(n))
    return weights * keep, ids.masked_fill(~keep, -1)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["value", "k_min"])
    def _expert_drop_kernel(w_ptr, ids_ptr, w_out_ptr, ids_out_ptr, hist_ptr, K, value, k_min,
                            TOP_P: tl.constexpr, HAS_HIST: tl.constexpr, K_P2: tl.constexpr):
        t = tl.program_id(0)
        cols = tl.arange(0, K_P2)
        valid = cols < K
        w = tl.load(w_ptr + t * K + cols, mask=valid, other=0.0)
        share = w / tl.maximum(tl.sum(w, 0), 1e-20)
        # above[i, j]: candidate j ranks above candidate i (larger share, or equal share and a lower column)
        si = share[:, None]
        sj = share[None, :]
        above = ((sj > si) | ((sj == si) & (cols[None, :] < cols[:, None]))) & valid[None, :]
        rank = tl.sum(above.to(tl.int32), 1)  # (K_P2,)
        if TOP_P:
            mass_above = tl.sum(tl.where(above, sj, 0.0), 1)
            n = tl.sum(((mass_above < value) & valid).to(tl.int32), 0)
        else:
            entropy = -tl.sum(tl.where(share > 0, share * tl.log(tl.maximum(share, 1e-20)), 0.0), 0)
            n = tl.ceil(value * tl.exp(entropy)).to(tl.int32)
        n = tl.minimum(tl.maximum(n, k_min), K)
        keep = rank < n
        ids = tl.load(ids_ptr + t * K + cols, mask=valid, other=-1)
        tl.store(w_out_ptr + t * K + cols, tl.where(keep, w, 0.0), mask=valid)
        tl.store(ids_out_ptr + t * K + cols, tl.where(keep, ids, -1), mask=valid)
        if HAS_HIST:
            tl.atomic_add(hist_ptr + n, 1)


def expert_drop(weights: torch.Tensor, ids: torch.Tensor, rule: str, value: float, k_min: int = 1,
                hist: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weights (T, K) float32 and ids (T, K) of each token's candidates -> (weights, ids) with the dropped ones
    0 and -1 in place; hist (int64, >= K + 1 entries) counts tokens by experts kept. One kernel on CUDA with
    Triton (no host sync, graph-capturable); otherwise `expert_drop_ref`. Ties are broken the same way in both."""
    _check(weights, ids, rule, k_min, hist)
    if not (HAS_TRITON and weights.is_cuda) or torch.is_grad_enabled() and weights.requires_grad:
        return expert_drop_ref(weights, ids, rule, value, k_min, hist)
    return _launch(weights, ids, rule, value, k_min, hist)


def _launch(weights, ids, rule, value, k_min, hist):
    T, K = weights.shape
    w_out, ids_out = torch.empty_like(weights), torch.empty_like(ids)
    if T == 0:
        return w_out, ids_out
    weights, ids = weights.contiguous(), ids.contiguous()
    top_p = rule == "top_p"
    # p >= 1 keeps everything: a bound no candidate's higher-ranked mass (<= 1 + rounding) reaches
    value = 2.0 if top_p and value >= 1 else float(value)
    _expert_drop_kernel[(T,)](weights, ids, w_out, ids_out, hist if hist is not None else weights, K, value, k_min,
                              TOP_P=top_p, HAS_HIST=hist is not None, K_P2=triton.next_power_of_2(K), num_warps=1)
    return w_out, ids_out
