"""Training losses as free functions on tensors: token log-probs, GRPO, DPO and MoE load balancing.

Each is tested on hand-built tensors (tests/test_train.py); the trainers only wire them together.
"""

import torch
import torch.nn.functional as F

AGGREGATIONS = ("token-mean", "seq-mean", "dr-grpo")


# ---------------------------------------------------------------- token log-probs

def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: logits (..., V), targets (...) -> (...) float32.

        logp_t = logits_t[y_t] - logsumexp(logits_t)
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return -F.cross_entropy(flat, targets.reshape(-1), reduction="none").view(targets.shape)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution per position: logits (..., V) -> (...) float32.

        H_t = -sum_v p_v log p_v,  p = softmax(logits_t)
    """
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- GRPO

def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages for G samples per prompt, groups contiguous: rewards (N*G,) -> (N*G,) float32.

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)   scale=True (GRPO; std with Bessel's correction)
        A_i =  r_i - mean_g(r)                        scale=False (Dr. GRPO: no std, which favours easy and
                                                      hard prompts over ambiguous ones)
    A group whose rewards are all equal gets zero advantages (no learning signal).
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (>= 2)")
    r = rewards.float().view(-1, group_size)  # (N, G)
    adv = r - r.mean(-1, keepdim=True)
    if scale:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.view(-1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
    aggregation: str = "token-mean",
    max_len: int | None = None,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped token-level policy-gradient loss (PPO/GRPO). Shapes: logp, old_logp, ref_logp, mask (B, T);
    advantages (B,) per sequence or (B, T) per token.

        ratio_t = exp(logp_t - old_logp_t)
        l_t     = -min(ratio_t * A, clip(ratio_t, 1 - clip_eps, 1 + clip_eps_high) * A)
                  + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)          (k3 KL estimator, beta > 0)
    aggregated over the masked tokens:
        "token-mean"  sum_{b,t} m l / sum_{b,t} m                   (DAPO; the default)
        "seq-mean"    1/B sum_b (sum_t m l / sum_t m)                (GRPO as published)
        "dr-grpo"     sum_{b,t} m l / (B * max_len)                  (Dr. GRPO: a constant normaliser,
                                                                     max_len defaults to T)
    clip_eps_high defaults to clip_eps (set it higher for DAPO's clip-higher).

    stats (detached scalars over masked tokens): clip_frac (the clipped term was taken, so no gradient:
    ratio < 1 - eps with A < 0, or ratio > 1 + eps_high with A > 0), clip_low_frac, clip_high_frac, ratio_mean, kl
    (mean k3 estimate; present whenever ref_logp is given).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp")
    clip_high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logp.dtype)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    kl = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * kl

    n_tokens = mask.sum().clamp(min=1)
    if aggregation == "token-mean":
        loss = (per_token * mask).sum() / n_tokens
    elif aggregation == "seq-mean":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    else:
        loss = (per_token * mask).sum() / (mask.shape[0] * (max_len or mask.shape[1]))

    with torch.no_grad():
        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return (x.to(mask.dtype) * mask).sum() / n_tokens

        adv_full = adv.expand_as(ratio)
        low = (ratio < 1 - clip_eps) & (adv_full < 0)
        high = (ratio > 1 + clip_high) & (adv_full > 0)
        stats = {"clip_frac": masked_mean(low | high), "clip_low_frac": masked_mean(low),
                 "clip_high_frac": masked_mean(high), "ratio_mean": masked_mean(ratio)}
        if kl is not None:
            stats["kl"] = masked_mean(kl)
    return loss, stats


# ---------------------------------------------------------------- DPO

def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation on sequence-summed log-probs, each (B,).

        r_c = beta * (logpi(y_c) - logref(y_c)),  r_r = beta * (logpi(y_r) - logref(y_r))
        loss = mean_b -log sigmoid(r_c - r_r)
    Returns (loss, r_c detached, r_r detached): the implicit rewards, logged to watch the margin.
    """
    chosen = beta * (policy_chosen_logp - ref_chosen_logp)
    rejected = beta * (policy_rejected_logp - ref_rejected_logp)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


# ---------------------------------------------------------------- MoE load balancing

@torch.no_grad()
def update_router_bias(bias: torch.Tensor, expert_counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free balancing, in place, outside autograd: bias (E,), expert_counts (E,)
    tokens routed to each expert over the step.

        bias_i += gamma * sign(mean_j(c_j) - c_i)
    Overloaded experts become less likely to be chosen, idle ones more. The bias only selects experts; the
    gate weights still come from the unbiased scores.
    """
    load = expert_counts.to(device=bias.device, dtype=torch.float32)
    bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)
    return bias


def sequence_aux_loss(router_probs: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, alpha: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss. router_probs (B, T, E): per-token affinities
    normalised over experts (s_{i,t} / sum_j s_{j,t}; softmax probabilities for softmax routers); topk_ids
    (B, T, K) the chosen experts; mask (B, T) the real tokens (default all).

        f_i = E / (K T) * sum_t 1[i in topk_t]      P_i = 1/T sum_t s'_{i,t}
        L   = alpha * mean_b sum_i f_i P_i
    Perfectly balanced routing (f_i = 1, P_i = 1/E) gives L = alpha.
    """
    B, T, K = topk_ids.shape
    m = torch.ones(B, T, device=router_probs.device) if mask is None else mask.to(router_probs.device).float()
    n = m.sum(-1).clamp(min=1)  # (B,) real tokens per sequence
    chosen = torch.zeros(B, T, num_experts, device=router_probs.device)
    chosen.scatter_(-1, topk_ids.long(), 1.0)
    f = num_experts / (K * n[:, None]) * (chosen * m[..., None]).sum(1)  # (B, E), no gradient
    p = (router_probs.float() * m[..., None]).sum(1) / n[:, None]         # (B, E)
    return alpha * (f * p).sum(-1).mean()


def router_z_loss(router_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss, keeping router logits small: router_logits (..., E), mask (...) optional.

        L_z = mean_t (logsumexp_i x_{t,i})^2
    """
    z = torch.logsumexp(router_logits.float(), dim=-1) ** 2
    if mask is None:
        return z.mean()
    m = mask.to(z.device, z.dtype).reshape(z.shape)
    return (z * m).sum() / m.sum().clamp(min=1)
