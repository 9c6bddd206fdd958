"""Mixture-of-experts feed-forward: router, stacked routed experts, optional shared experts.

One module for every family; the routing differences are options:
  scoring_func  softmax (Mixtral, Qwen, OLMoE, DeepSeek-V2) or sigmoid (DeepSeek-V3)
  topk_method   greedy; group_limited_greedy (V2: keep the topk_group groups with the best expert);
                noaux_tc (V3: groups ranked by their two best biased scores, the bias only picks experts)

Dynamic expert count (an inference option, off by default): the router picks k_max candidates as it would with
top_k = k_max, then each token runs only the highest-weighted of them, as many as a rule says:
  top_p    the fewest whose share of the candidates' total weight reaches top_p
  entropy  ceil(entropy_scale * exp(H)), H the entropy of those shares (exp(H): the effective number of experts)
and always at least k_min. Dropped candidates are id -1 with weight 0, which the kernels skip, so they cost
nothing; weights keep the model's own semantics (norm_topk_prob renormalises over the experts that run). Shares
are taken over the candidates, not all experts, so a rule means the same for softmax and sigmoid routers.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from mixr.kernels.expert_drop import expert_drop
from mixr.kernels.fused_moe import fused_moe, fused_moe_ref
from mixr.kernels.router import can_fuse_route, choose_experts, fused_route
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
    # dynamic expert count (module docstring); None: exact top-k
    dynamic: str | None = None  # "top_p" | "entropy"
    top_p: float = 1.0
    entropy_scale: float = 1.0
    k_min: int = 1
    k_max: int | None = None  # candidates per token; default top_k

    @property
    def num_candidates(self) -> int:
        """Columns of the router's ids/weights: top_k, or k_max with a dynamic rule."""
        return self.top_k if self.dynamic is None else self.k_max or self.top_k

    def __post_init__(self):
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r} (softmax, sigmoid)")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"unsupported topk_method {self.topk_method!r} (greedy, group_limited_greedy, noaux_tc)")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} does not divide {self.num_experts} experts")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.top_k} must be in 1..{self.num_experts}")
        check_dynamic(self.dynamic, self.top_p, self.entropy_scale, self.k_min, self.k_max)
        if self.dynamic is not None and self.num_candidates > self.num_experts:
            raise ValueError(f"k_max={self.k_max} exceeds the {self.num_experts} experts")
        if self.dynamic is not None and self.k_min > self.num_candidates:
            raise ValueError(f"k_min={self.k_min} exceeds k_max={self.num_candidates}")


def check_dynamic(dynamic: str | None, top_p: float = 1.0, entropy_scale: float = 1.0, k_min: int = 1,
                  k_max: int | None = None) -> None:
    """Raise ValueError for dynamic-routing options that make no sense on any model."""
    if dynamic not in (None, "top_p", "entropy"):
        raise ValueError(f"unknown dynamic expert rule {dynamic!r}: use 'top_p', 'entropy' or None")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not entropy_scale > 0:
        raise ValueError(f"entropy_scale must be > 0, got {entropy_scale}")
    if k_min < 1:
        raise ValueError(f"k_min must be >= 1, got {k_min}")
    if k_max is not None and k_max < k_min:
        raise ValueError(f"k_max={k_max} must be >= k_min={k_min}")


class Router(nn.Module):
    def __init__(self, hidden_size: int, opts: RouterOptions):
        super().__init__()
        self.opts = opts
        self.weight = nn.Parameter(torch.empty(opts.num_experts, hidden_size))
        if opts.correction_bias:
            # Used only to choose experts, never to weight them; kept in float32 like DeepSeek's reference.
            self.register_buffer("e_score_correction_bias", torch.zeros(opts.num_experts, dtype=torch.float32))
        self._stats_buffer()

    def _stats_buffer(self) -> None:
        # experts_hist[n] = tokens that ran n experts, counted on the device (no host sync, graph-capturable).
        # Made on the CPU under a meta-device build (load_model moves non-persistent buffers); not in checkpoints.
        hist = None
        if self.opts.dynamic is not None:
            hist = torch.zeros(self.opts.num_candidates + 1, dtype=torch.int64,
                               device="cpu" if self.weight.is_meta else self.weight.device)
        self.register_buffer("experts_hist", hist, persistent=False)
        # The routing without normalisation or scaling and with top_k = k_max, for the fused router kernels.
        self._candidate_opts = replace(self.opts, top_k=self.opts.num_candidates, norm_topk_prob=False,
                                       routed_scaling_factor=1.0, dynamic=None, top_p=1.0, entropy_scale=1.0,
                                       k_min=1, k_max=None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, H) -> weights (T, k) float32, expert ids (T, k), router logits (T, E) float32."""
        # CUDA inference: the same routing as below in two kernels (mixr.kernels.router); it declines any
        # option it does not implement (the dynamic expert count), autograd, and CPU tensors.
        if can_fuse_route(x, self.weight, self.opts):
            return fused_route(x, self.weight, getattr(self, "e_score_correction_bias", None), self.opts)
        o = self.opts
        if o.dynamic is not None and can_fuse_route(x, self.weight, self._candidate_opts):
            # the same kernels pick the k_max candidates with their raw weights; dropping and normalising follow
            weights, ids, logits = fused_route(x, self.weight, getattr(self, "e_score_correction_bias", None),
                                               self._candidate_opts)
            return self._finish(weights, ids, logits)
        # Routing decides which experts run: keep it in float32 even under autocast, which would run this in bf16.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if o.scoring_func == "softmax" else logits.sigmoid()
        ids = choose_experts(scores, self.e_score_correction_bias if o.correction_bias else None, o,
                             o.num_candidates)
        return self._finish(scores.gather(1, ids), ids, logits)

    def _finish(self, weights: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw candidate weights -> the dynamic drop (when set), normalisation, scaling."""
        o = self.opts
        if o.dynamic is not None:
            # Keep each token's n highest-weighted candidates; the rest become id -1 with weight 0 where they
            # stand, so when nothing is dropped the output is exactly the top-k routing's.
            value = o.top_p if o.dynamic == "top_p" else o.entropy_scale
            weights, ids = expert_drop(weights, ids, o.dynamic, value, o.k_min, self.experts_hist)
        if o.norm_topk_prob and o.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * o.routed_scaling_factor, ids, logits


class Experts(nn.Module):
    """E SwiGLU experts stacked for grouped kernels: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (T, H), ids/weights (T, k) -> (T, H); `shared`: a shared expert's (gate, up, down) weights to add,
        inference only (see MoE._fused_shared). The Triton kernels have no backward: anything that needs
        gradients takes the plain-PyTorch path."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad
                                                  or self.gate_up_proj.requires_grad)
        if needs_grad:
            return fused_moe_ref(x, self.gate_up_proj, self.down_proj, ids, weights)
        return fused_moe(x, self.gate_up_proj, self.down_proj, ids, weights, shared=shared)

    def shared_operands(self, linears: tuple[nn.Module, nn.Module, nn.Module]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """A shared expert's (gate, up, down) in the form `forward(shared=...)` takes, or None unless they are
        plain bias-free linears that need no gradients (the kernels have no backward)."""
        if not all(isinstance(m, nn.Linear) and m.bias is None for m in linears):
            return None
        if torch.is_grad_enabled() and any(m.weight.requires_grad for m in linears):
            return None
        return tuple(m.weight for m in linears)


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
        shared = self._fused_shared(x)
        out = self.experts(x, ids, weights, shared=shared) if shared else self.experts(x, ids, weights)
        if self.shared_gated:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif hasattr(self, "shared_experts") and not shared:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def _fused_shared(self, x: torch.Tensor) -> tuple | None:
        """The shared expert's weights, when the routed-expert kernels may run it (at decode batch sizes they do
        it in the same launches): GPU inference, linears of the routed experts' kind (see their
        `shared_operands`), and no hooks, since GPTQ calibration and adapters must see the shared expert's modules
        run."""
        mlp = getattr(self, "shared_experts", None)
        operands = getattr(self.experts, "shared_operands", None)
        if mlp is None or operands is None or not x.is_cuda:
            return None
        linears = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(m._forward_hooks or m._forward_pre_hooks for m in (mlp, *linears)):
            return None
        return operands(linears)


def set_dynamic_experts(model: nn.Module, dynamic: str | None, top_p: float = 1.0, entropy_scale: float = 1.0,
                        k_min: int = 1, k_max: int | None = None) -> int:
    """Set (or with dynamic=None, clear) the dynamic expert rule of every Router in `model` and zero their
    statistics. k_max defaults to each router's top_k. Returns the number of routers. CUDA graphs captured
    before this call still run the old routing: capture after."""
    check_dynamic(dynamic, top_p, entropy_scale, k_min, k_max)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for r in routers:
        if dynamic is None:
            r.opts = replace(r.opts, dynamic=None, top_p=1.0, entropy_scale=1.0, k_min=1, k_max=None)
        else:
            r.opts = replace(r.opts, dynamic=dynamic, top_p=top_p, entropy_scale=entropy_scale, k_min=k_min,
                             k_max=k_max)
        r._stats_buffer()
    return len(routers)


def dynamic_expert_stats(model: nn.Module, reset: bool = False) -> dict | None:
    """Routed experts run per token since the routers were set (or last reset), from their device counters:
    {"avg_experts_per_token", "tokens" (token-layer visits), "histogram" (tokens by experts run, over layers),
    "per_layer_avg"}; None when no router has a dynamic rule. One host sync. Under CUDA graphs the padding
    rows of a decode batch are counted too (none at batch sizes that are graph sizes)."""
    hists = [m.experts_hist for m in model.modules() if isinstance(m, Router) and m.experts_hist is not None]
    if not hists:
        return None
    width = max(h.numel() for h in hists)
    counts = torch.stack([F.pad(h, (0, width - h.numel())) for h in hists]).cpu().double()  # (layers, K+1)
    if reset:
        for h in hists:
            h.zero_()
    n = torch.arange(width, dtype=torch.float64)
    per_token = counts.sum(0)
    tokens = per_token.sum().item()
    per_layer = (counts * n).sum(1) / counts.sum(1).clamp(min=1)
    return {"avg_experts_per_token": (per_token * n).sum().item() / tokens if tokens else float("nan"),
            "tokens": int(tokens), "histogram": per_token.long().tolist(), "per_layer_avg": per_layer.tolist()}
