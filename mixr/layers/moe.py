"""Mixture-of-experts feed-forward: router, stacked routed experts, optional shared experts.

One module for every family; the routing differences are options:
  scoring_func  softmax (Mixtral, Qwen, OLMoE, DeepSeek-V2) or sigmoid (DeepSeek-V3)
  topk_method   greedy; group_limited_greedy (V2: keep the topk_group groups with the best expert);
                noaux_tc (V3: groups ranked by their two best biased scores, the bias only picks experts)
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixr.kernels.fused_moe import fused_moe, fused_moe_ref
from mixr.layers.mlp import GatedMLP


@dataclass(frozen=True, slots=True)
class RouterOptions:
    num_experts: int
    top_k: int
    scoring_func: str = "softmax"
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # DeepSeek-V3's e_score_correction_bias

    def __post_init__(self):
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r} (softmax, sigmoid)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"unsupported topk_method {self.topk_method!r} (greedy, group_limited_greedy, noaux_tc)")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} does not divide {self.num_experts} experts")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in 1..{self.num_experts}")


class Router(nn.Module):
    def __init__(self, hidden_size: int, opts: RouterOptions):
        super().__init__()
        self.opts = opts
        self.weight = nn.Parameter(torch.empty(opts.num_experts, hidden_size))
        if opts.correction_bias:
            # Used only to choose experts, never to weight them; kept in float32 like DeepSeek's reference.
            self.register_buffer("e_score_correction_bias", torch.zeros(opts.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, H) -> weights (T, k) float32, expert ids (T, k), router logits (T, E) float32."""
        o = self.opts
        # Routing decides which experts run: keep it in float32 even under autocast, which would run this in bf16.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if o.scoring_func == "softmax" else logits.sigmoid()
        choice = scores + self.e_score_correction_bias if o.correction_bias else scores
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
        ids = choice.topk(o.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if o.norm_topk_prob and o.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * o.routed_scaling_factor, ids, logits


class Experts(nn.Module):
    """E SwiGLU experts stacked for grouped kernels: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H), ids/weights (T, k) -> (T, H). The Triton kernels have no backward: anything that needs
        gradients takes the plain-PyTorch path."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad
                                                  or self.gate_up_proj.requires_grad)
        moe = fused_moe_ref if needs_grad else fused_moe
        return moe(x, self.gate_up_proj, self.down_proj, ids, weights)


class MoE(nn.Module):
    """Routed experts plus shared experts.

    DeepSeek: `shared_experts`, always added. Qwen2-MoE: one `shared_expert` scaled by sigmoid(`shared_expert_gate`).
    Attribute names follow the checkpoint keys of each family.
    """

    def __init__(self, hidden_size: int, moe_intermediate_size: int, router: RouterOptions,
                 shared_intermediate_size: int = 0, shared_gate: bool = False):
        super().__init__()
        self.gate = Router(hidden_size, router)
        self.experts = Experts(router.num_experts, hidden_size, moe_intermediate_size)
        self.shared_gated = shared_gate
        if shared_gate:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)
        elif shared_intermediate_size:
            self.shared_experts = GatedMLP(hidden_size, shared_intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids, _ = self.gate(x)
        out = self.experts(x, ids, weights)
        if self.shared_gated:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out.view(shape)
