"""quantize_model: swap a model's linear layers and stacked experts for packed weight-only modules, in place.

Which layers: every nn.Linear inside the decoder layers and every stacked `Experts`. Kept in full precision (and
named so in the config's `modules_to_not_convert`): the embeddings and lm_head (a small share of a MoE model's
weights, and the most sensitive), norms, routers (`mlp.gate`: they choose the experts), Qwen2-MoE's
`shared_expert_gate` (one output), and MLA's `kv_b_proj`, which the absorbed decode path reads as a dense matrix.

Methods: "rtn" (round to nearest) and "gptq" (calibrated: layer by layer, each layer's Hessians from the inputs
it sees with every earlier layer already quantized; per-expert Hessians from the tokens routed to each expert).
"""

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixr.layers.moe import Experts
from mixr.quant.gptq import quantize_gptq
from mixr.quant.modules import Fp8Linear, QuantExperts, QuantLinear, QuantWeight
from mixr.quant.rtn import GROUP_SIZES, QuantSpec, quantize_rtn

MODULES_TO_NOT_CONVERT = ["embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm",
                          "q_a_layernorm", "kv_a_layernorm", "q_norm", "k_norm", "gate", "shared_expert_gate",
                          "kv_b_proj"]
METHODS = ("rtn", "gptq")


def quant_targets(model: nn.Module, skip: list[str] = MODULES_TO_NOT_CONVERT) -> dict[str, nn.Module]:
    """name -> nn.Linear or Experts to quantize: those inside model.model.layers whose name has no part in skip."""
    out = {}
    for name, m in model.model.layers.named_modules(prefix="model.layers"):
        if isinstance(m, (nn.Linear, Experts)) and not set(name.split(".")) & set(skip):
            out[name] = m
    return out


def _in_features(m: nn.Module) -> list[int]:
    return [m.in_features] if isinstance(m, nn.Linear) else [m.gate_up_proj.shape[2], m.down_proj.shape[2]]


def auto_group_size(model: nn.Module, skip: list[str] = MODULES_TO_NOT_CONVERT) -> int:
    """The largest supported int4 group size that divides the input width of every layer to quantize."""
    widths = {k for m in quant_targets(model, skip).values() for k in _in_features(m)}
    for g in sorted(GROUP_SIZES, reverse=True):
        if all(k % g == 0 for k in widths):
            return g
    bad = min(widths, key=lambda k: (k % GROUP_SIZES[0] == 0, k))
    raise ValueError(f"no int4 group size ({', '.join(map(str, GROUP_SIZES))}) divides every layer's input width "
                     f"({bad} does not split)")


def check_widths(model: nn.Module, spec: QuantSpec, skip: list[str] = MODULES_TO_NOT_CONVERT
                 ) -> dict[str, nn.Module]:
    """quant_targets, after checking that every one's input width splits into groups (ValueError naming the
    first that does not, with a group size that would fit). Works on a meta-device model."""
    targets = quant_targets(model, skip)
    for name, m in targets.items():
        parts = [(name, m.in_features)] if isinstance(m, nn.Linear) else \
            [(f"{name}.gate_up_proj", m.gate_up_proj.shape[2]), (f"{name}.down_proj", m.down_proj.shape[2])]
        for part, K in parts:
            try:
                spec.groups(K, part)
            except ValueError as e:
                try:
                    hint = f"; group size {auto_group_size(model, skip)} fits every layer"
                except ValueError:
                    hint = ""
                raise ValueError(f"{e}{hint}") from None
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def empty_quant_module(m: nn.Module, spec: QuantSpec, dtype: torch.dtype, device, name: str) -> nn.Module:
    """The quantized counterpart of an nn.Linear or Experts, with uninitialised buffers (meta for loading)."""
    if isinstance(m, nn.Linear):
        return QuantLinear(m.in_features, m.out_features, m.bias is not None, spec, dtype, device, name)
    E, two_i, H = m.gate_up_proj.shape
    return QuantExperts(E, H, two_i // 2, spec, dtype, device, name)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantWeight, QuantExperts, Fp8Linear)) for m in model.modules())


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "rtn", bits: int = 4, group_size: int | None = 128,
                   zero_point: bool = False, calib_ids: torch.Tensor | None = None,
                   modules_to_not_convert: list[str] | None = None, progress: bool = False, **gptq_options) -> dict:
    """Quantize `model` in place; returns the `quantization_config` (also written into model.config.hf, so
    save_model stores it). bits 8: per-channel (group_size is ignored); bits 4: group_size 32/64/128.

    method "gptq" needs calib_ids: (n, L) token ids of calibration text. gptq_options: damp (0.01),
    prior_tokens (16: each expert's gate/up Hessian is shrunk toward the layer's all-token input Hessian by this
    many tokens' worth, so a rarely routed expert does not overfit its few calibration tokens), act_order (True),
    batch_size (8 calibration sequences per forward).
    Raises ValueError (nothing changed) for a bad format, a layer whose width does not split into groups, or a
    model that is already quantized."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    spec = QuantSpec(bits, group_size if bits == 4 else None, zero_point)
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    skip = list(modules_to_not_convert or MODULES_TO_NOT_CONVERT)
    targets = check_widths(model, spec, skip)
    if gptq_options and method != "gptq":
        raise ValueError(f"{', '.join(gptq_options)}: options of method 'gptq', not {method!r}")
    if method == "gptq":
        if calib_ids is None or calib_ids.dim() != 2 or calib_ids.numel() == 0:
            raise ValueError("method 'gptq' needs calib_ids: a non-empty (n, L) tensor of calibration token ids")
        _gptq_model(model, targets, spec, calib_ids, progress, **gptq_options)
    else:
        for name, m in tqdm(targets.items(), desc="Quantizing", disable=not progress):
            replace_module(model, name, _packed_module(m, spec, name, quantize_rtn))
    config = {"quant_method": "mixr", "bits": bits, "group_size": spec.group_size, "zero_point": zero_point,
              "method": method, "modules_to_not_convert": skip}
    model.config.hf = dict(getattr(model.config, "hf", {}), quantization_config=config)
    return config


def _packed_module(m: nn.Module, spec: QuantSpec, name: str, quantize, *hessians) -> nn.Module:
    """Build m's quantized module with `quantize(weight, [hessian,] spec, dtype, name)` for each of its weights."""
    if isinstance(m, nn.Linear):
        dtype, device = m.weight.dtype, m.weight.device
        new = QuantLinear(m.in_features, m.out_features, m.bias is not None, spec, dtype, "meta", name)
        new.set(*quantize(m.weight, *hessians, spec, dtype, name))
        if m.bias is not None:
            new.bias = m.bias.detach()
        return new.to(device)
    dtype, device = m.gate_up_proj.dtype, m.gate_up_proj.device
    new = empty_quant_module(m, spec, dtype, "meta", name)
    h_gate_up, h_down = ((hessians[0],), (hessians[1],)) if hessians else ((), ())
    new.gate_up_proj.set(*quantize(m.gate_up_proj, *h_gate_up, spec, dtype, f"{name}.gate_up_proj"))
    new.down_proj.set(*quantize(m.down_proj, *h_down, spec, dtype, f"{name}.down_proj"))
    return new.to(device)


# ---------------------------------------------------------------- GPTQ over the model

class _LinearStats:
    def __init__(self, m: nn.Linear):
        self.H = torch.zeros(m.in_features, m.in_features, device=m.weight.device)

    def __call__(self, module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.H.addmm_(x.T, x)


class _ExpertStats:
    """Per-expert Hessians: gate_up from the tokens routed to the expert, down from those tokens' activations
    silu(gate) * up (rounded to the model dtype, as the kernels feed them to the down GEMM)."""

    def __init__(self, m: Experts):
        E, two_i, H = m.gate_up_proj.shape
        dev = m.gate_up_proj.device
        self.gate_up = torch.zeros(E, H, H, device=dev)
        self.down = torch.zeros(E, two_i // 2, two_i // 2, device=dev)
        self.all = torch.zeros(H, H, device=dev)
        self.tokens = 0

    def __call__(self, module, args):
        x, ids, _ = args
        xf = x.float()
        self.all.addmm_(xf.T, xf)
        self.tokens += x.shape[0]
        for e in range(module.gate_up_proj.shape[0]):
            rows = (ids == e).any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            xe = xf[rows]
            self.gate_up[e].addmm_(xe.T, xe)
            gate, up = F.linear(x[rows], module.gate_up_proj[e]).float().chunk(2, dim=-1)
            act = (F.silu(gate) * up).to(x.dtype).float()
            self.down[e].addmm_(act.T, act)

    def hessians(self, prior_tokens: float) -> tuple[torch.Tensor, torch.Tensor]:
        prior = self.all / max(self.tokens, 1)
        return self.gate_up + prior_tokens * prior, self.down


class _Stop(Exception):
    """Raised by a hook after the layer being calibrated: nothing later needs to run."""


def _stop(module, args, output):
    raise _Stop


@torch.no_grad()
def _gptq_model(model: nn.Module, targets: dict[str, nn.Module], spec: QuantSpec, calib_ids: torch.Tensor,
                progress: bool, damp: float = 0.01, prior_tokens: float = 16.0, act_order: bool = True,
                batch_size: int = 8) -> None:
    """Layer by layer: run the calibration set through the model (every earlier layer already quantized) up to
    layer i, with hooks collecting the Hessians of layer i's targets, then quantize them. Re-running the prefix
    costs L^2/2 layer forwards instead of L, but uses only the model's own forward, whatever a layer's signature."""
    device = model.lm_head.weight.device
    ids = calib_ids.to(device)

    def quantize(w, h, spec, dtype, name):
        return quantize_gptq(w, h, spec, dtype, name, damp=damp, act_order=act_order)

    for i, layer in enumerate(tqdm(model.model.layers, desc="GPTQ", disable=not progress)):
        mine = {n: m for n, m in targets.items() if n.startswith(f"model.layers.{i}.")}
        stats = {n: (_LinearStats(m) if isinstance(m, nn.Linear) else _ExpertStats(m)) for n, m in mine.items()}
        hooks = [m.register_forward_pre_hook(stats[n]) for n, m in mine.items()]
        hooks.append(layer.register_forward_hook(_stop))
        try:
            for b in range(0, len(ids), batch_size):
                try:
                    model.hidden_states(ids[b:b + batch_size])
                except _Stop:
                    pass
        finally:
            for h in hooks:
                h.remove()
        for n, m in mine.items():
            s = stats.pop(n)
            hess = (s.H,) if isinstance(s, _LinearStats) else s.hessians(prior_tokens)
            replace_module(model, n, _packed_module(m, spec, n, quantize, *hess))
