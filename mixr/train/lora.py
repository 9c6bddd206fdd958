"""LoRA adapters on a mixr model, saved and loaded in peft's format, and SFT with them (`train_lora`).

Two kinds of target, named as peft names them:
  target_modules     nn.Linear modules (attention projections, dense MLPs, shared experts, lm_head):
                     y = W x + b + s B A x,  A (r, in), B (out, r)
  target_parameters  the stacked routed experts, `mlp.experts.gate_up_proj` (E, 2I, H) and
                     `mlp.experts.down_proj` (E, H, I): one pair per expert, W_e + s B_e A_e with
                     A (E, r, in), B (E, out, r)
with s = lora_alpha / r (use_rslora: lora_alpha / sqrt(r)). A starts uniform in +-1/sqrt(in), B at zero, as
in peft, so a new adapter changes nothing until it is trained.

On disk: adapter_config.json + adapter_model.safetensors, keys `base_model.model.<module>.lora_A.weight` /
`lora_B.weight` under the checkpoint's module names. Experts use the layout of peft's `ParamWrapper` (what
peft makes of `target_parameters` on transformers-5 MoE models, whose experts are 3-D parameters too):
lora_A.weight (E*r, in) holds A[e] in rows e*r .. e*r+r-1; lora_B.weight (out, r*E) holds B[e][:, j] in
column j*E + e. When both expert parameters are adapted peft nests its wrappers in parameter order, so
gate_up_proj's tensors are `experts.base_layer.lora_*` and down_proj's `experts.lora_*`. Loading also accepts
transformers-4-era adapters with one LoRA per expert Linear (`experts.{e}.gate_proj.lora_A.weight`, Mixtral's
w1/w3/w2): gate and up become one gate_up_proj pair of rank r_gate + r_up (A stacked, B block-diagonal), as
peft's own conversion does. Caveat on the peft side (0.21): for transformers-5 DeepSeek / Qwen-MoE / OLMoE /
Mixtral models peft reads gate_proj/up_proj/down_proj (w1/w3/w2) in target_modules as the routed experts, so
adapters on dense MLPs or shared experts load in mixr but not in peft on those models.

Not peft's code: peft replaces each target with a wrapper (`q_proj.base_layer.weight`), which renames the
parameters that checkpoint saving and the engine rely on, and its expert wrapper rebuilds W + BA for every
expert on each forward. Here the base `weight` keeps its name and Parameter object, and the expert LoRA terms
are added inside the per-expert loop (x_e A_e^T B_e^T on the tokens routed to e). peft is the tests' reference.

The engine runs merged weights (`merge_lora`): MLA's absorbed decode reads kv_b_proj.weight directly, so an
unmerged kv_b_proj adapter would be skipped there.
"""

import contextlib
import json
import math
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from mixr.checkpoint import load_model
from mixr.kernels.fused_moe import fused_moe, fused_moe_ref
from mixr.layers.moe import Experts
from mixr.models.base import CausalLM
from mixr.tokenizer import Tokenizer
from mixr.train.config import TrainConfig
from mixr.train.losses import token_logprobs
from mixr.train.sft import batch_indices, collate, encode_example, load_rows, lr_at

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # registration order in Experts: peft nests in this order
# every attention projection name of the supported families; names a model lacks simply match nothing
ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "k_proj", "v_proj",
                     "o_proj")
# peft options that change what an adapter computes and that mixr does not implement
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "modules_to_save": None,
                "layers_to_transform": None, "layer_replication": None, "trainable_token_indices": None,
                "exclude_modules": None, "use_qalora": False, "use_bdlora": None, "alora_invocation_tokens": None}


class AdapterError(ValueError):
    """An adapter directory that cannot be applied; the message names the file, key or setting at fault."""


@dataclass
class LoraConfig:
    """The adapter settings, as peft's LoraConfig names them. target_modules: names (a module matches when its
    name is one of them or ends with "." + one) or one regex matched against the whole name; target_parameters:
    the same for `<experts module>.gate_up_proj|down_proj`. rank_pattern / alpha_pattern: regex -> r / alpha
    for the targets whose name ends with a match (peft's rule)."""

    r: int = 16
    lora_alpha: float = 32.0
    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION_TARGETS))
    target_parameters: list[str] = field(default_factory=lambda: [f"experts.{p}" for p in EXPERT_PARAMS])
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        return _pattern_value(self.rank_pattern, key, self.r), _pattern_value(self.alpha_pattern, key, self.lora_alpha)

    @classmethod
    def from_peft(cls, d: dict, where: str = CONFIG_NAME) -> "LoraConfig":
        """From an adapter_config.json dict; refuses the peft options that mixr does not implement. lora_dropout
        is ignored: it only acts in training, which does not use it here."""
        if d.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{where}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
        for key, default in _UNSUPPORTED.items():
            if d.get(key, default) not in (default, [], {}):
                raise AdapterError(f"{where}: {key}={d[key]!r} is not supported")
        if d.get("bias", "none") != "none":
            raise AdapterError(f"{where}: bias={d['bias']!r} is not supported (only 'none')")
        targets = d.get("target_modules") or []
        return cls(r=int(d["r"]), lora_alpha=float(d.get("lora_alpha", 8)),
                   target_modules=targets if isinstance(targets, str) else list(targets),
                   target_parameters=list(d.get("target_parameters") or []),
                   use_rslora=bool(d.get("use_rslora", False)),
                   rank_pattern=dict(d.get("rank_pattern") or {}), alpha_pattern=dict(d.get("alpha_pattern") or {}))


def _pattern_value(patterns: dict, key: str, default):
    """peft's get_pattern_key: the first pattern that matches a dotted suffix of key."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _matches(targets: list[str] | str, name: str) -> bool:
    """peft's check_target_module_exists for a list of names or one regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


# ---------------------------------------------------------------- modules

def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _low_rank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B A x for rows x (n, in), A (r, in), B (out, r)."""
    return F.linear(F.linear(_input_for(x, A), A) * scaling, B)


def _input_for(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x in the adapter's dtype, unless autocast will cast both anyway (then a copy would only cost memory)."""
    if x.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


class LoraLinear(nn.Module):
    """An nn.Linear plus s * B A. `weight` and `bias` are the replaced Linear's own Parameters, so their names
    (`q_proj.weight`) do not change; the adapter is `lora_A.weight` (r, in) and `lora_B.weight` (out, r), the
    names peft gives them."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=torch.float32)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = _scaling(r, alpha, use_rslora)
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.disabled:
            return out
        h = self.lora_A(_input_for(x, self.lora_A.weight)) * self.scaling  # (..., r)
        return out + self.lora_B(h).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """s * B A (out, in), float32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}"


class ExpertLora(nn.Module):
    """The adapter of one stacked expert parameter (E, out, in): lora_A (E, r, in), lora_B (E, out, r)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, alpha: float,
                 use_rslora: bool = False, device=None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(num_experts, r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device))
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = _scaling(r, alpha, use_rslora)

    def factors(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per-expert views of A and B. Taken once per forward with unbind: indexing lora_A[e] inside the expert
        loop would make autograd build one zero-filled gradient of the whole stack per expert."""
        return self.lora_A.unbind(0), self.lora_B.unbind(0)

    def delta(self, e: int) -> torch.Tensor:
        return self.scaling * (self.lora_B[e].float() @ self.lora_A[e].float())

    def extra_repr(self) -> str:
        E, out, r = self.lora_B.shape
        return f"experts={E}, in_features={self.lora_A.shape[-1]}, out_features={out}, r={r}, alpha={self.alpha}"


class LoraExperts(nn.Module):
    """`Experts` with adapters on gate_up_proj and/or down_proj (`lora` holds them by parameter name). The base
    parameters keep their names and objects."""

    def __init__(self, base: Experts):
        super().__init__()
        self.gate_up_proj = base.gate_up_proj
        self.down_proj = base.down_proj
        self.lora = nn.ModuleDict()
        self.disabled = False

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H), ids/weights (T, k) -> (T, H), as Experts.forward."""
        active = {} if self.disabled else dict(self.lora.items())
        gate_up_lora, down_lora = active.get("gate_up_proj"), active.get("down_proj")
        if gate_up_lora is None and down_lora is None:
            needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad
                                                      or self.gate_up_proj.requires_grad)
            return (fused_moe_ref if needs_grad else fused_moe)(x, self.gate_up_proj, self.down_proj, ids, weights)
        # fused_moe_ref's loop, with the LoRA terms added inside the SiLU (so they cannot be a separate pass)
        T, H = x.shape
        k = ids.shape[1]
        E = self.gate_up_proj.shape[0]
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)  # see ExpertLora.factors
        gu = gate_up_lora.factors() if gate_up_lora is not None else None
        dn = down_lora.factors() if down_lora is not None else None
        out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
        flat = ids.flatten().long()
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert, skipped (-1) ones first
        counts = torch.bincount(flat + 1, minlength=E + 1).tolist()  # the one host sync
        w = weights.flatten()
        start = counts.pop(0)
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            tok = pairs // k
            xe = x[tok]  # (n, H)
            h = F.linear(xe, gate_up[e])  # (n, 2I)
            if gu is not None:
                h = h + _low_rank(xe, gu[0][e], gu[1][e], gate_up_lora.scaling).to(h.dtype)
            gate, up = h.float().chunk(2, dim=-1)
            act = (F.silu(gate) * up).to(x.dtype)
            y = F.linear(act, down[e])  # (n, H)
            if dn is not None:
                y = y + _low_rank(act, dn[0][e], dn[1][e], down_lora.scaling).to(y.dtype)
            out.index_add_(0, tok, y.float() * w[pairs, None])
        return out.to(x.dtype)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear | LoraExperts]]:
    for name, m in model.named_modules():
        if isinstance(m, (LoraLinear, LoraExperts)):
            yield name, m


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters, in a fixed order (the optimizer's)."""
    out = []
    for _, m in lora_modules(model):
        for sub in ([m.lora_A, m.lora_B] if isinstance(m, LoraLinear) else list(m.lora.values())):
            out += list(sub.parameters())
    return out


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model: inside this block every adapter is skipped (e.g. DPO's reference forward)."""
    mods = [m for _, m in lora_modules(model)]
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


# ---------------------------------------------------------------- adding, merging

def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _targets(model: nn.Module, config: LoraConfig) -> tuple[list[str], dict[str, list[str]]]:
    """(Linear module names, experts module name -> adapted parameter names in EXPERT_PARAMS order)."""
    linears, experts = [], {}
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, m in model.named_modules():
        if isinstance(m, (LoraLinear, LoraExperts)):
            raise ValueError(f"{name} already has an adapter (merge_lora first, or load into a fresh model)")
        if name and config.target_modules and _matches(config.target_modules, name):
            if type(m) is not nn.Linear:
                raise ValueError(f"LoRA target {name} is a {type(m).__name__}; target_modules must name "
                                 "nn.Linear modules (the routed experts are target_parameters)")
            if tied and name.endswith("lm_head"):
                raise ValueError("lm_head shares its weight with embed_tokens (tie_word_embeddings): merging an "
                                 "adapter into it would change the embeddings too")
            linears.append(name)
        if isinstance(m, Experts):
            params = [p for p in EXPERT_PARAMS if _matches(config.target_parameters, f"{name}.{p}")]
            if params:
                experts[name] = params
    return linears, experts


def _attach(model: nn.Module, config: LoraConfig, linears: list[str], experts: dict[str, list[str]]) -> None:
    """Swap in the adapter modules (zero-initialised); freeze everything but the adapters."""
    model.requires_grad_(False)
    for name in linears:
        base = model.get_submodule(name)
        r, alpha = config.rank_and_alpha(name)
        _set_module(model, name, LoraLinear(base, r, alpha, config.use_rslora))
    for name, params in experts.items():
        base = model.get_submodule(name)
        wrapped = LoraExperts(base)
        for p in params:
            E, out_f, in_f = getattr(base, p).shape
            r, alpha = config.rank_and_alpha(f"{name}.{p}")
            wrapped.lora[p] = ExpertLora(E, in_f, out_f, r, alpha, config.use_rslora, getattr(base, p).device)
        _set_module(model, name, wrapped)
    for p in lora_parameters(model):
        p.requires_grad_(True)


@torch.no_grad()
def add_lora(model: nn.Module, config: LoraConfig, generator: torch.Generator | None = None) -> list[str]:
    """Add new adapters to `model` in place (A uniform in +-1/sqrt(in), B = 0: the output is unchanged) and
    freeze every other parameter. Returns the adapted names (modules, and experts `<module>.<param>`)."""
    linears, experts = _targets(model, config)
    if not linears and not experts:
        raise ValueError(f"no module matches target_modules={config.target_modules!r} or "
                         f"target_parameters={config.target_parameters!r}")
    _attach(model, config, linears, experts)
    for _, m in lora_modules(model):
        for sub in [m] if isinstance(m, LoraLinear) else list(m.lora.values()):
            A, B = (sub.lora_A.weight, sub.lora_B.weight) if isinstance(sub, LoraLinear) else (sub.lora_A, sub.lora_B)
            bound = 1 / math.sqrt(A.shape[-1])  # what kaiming_uniform_(a=sqrt(5)) gives nn.Linear and peft
            A.copy_((torch.rand(A.shape, generator=generator) * 2 - 1).mul_(bound))
            B.zero_()
    return linears + [f"{n}.{p}" for n, ps in experts.items() for p in ps]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += s B A, summed in float32 and rounded once to W's dtype)
    and put the plain modules back, so the model is again what load_model builds (its weights still frozen).
    In place; returns model."""
    for name, m in list(lora_modules(model)):
        if isinstance(m, LoraLinear):
            m.weight.copy_((m.weight.float() + m.delta()).to(m.weight.dtype))
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias  # the same Parameters, now merged
        else:
            for p, lora in m.lora.items():
                w = getattr(m, p)
                for e in range(w.shape[0]):  # one expert at a time: no second copy of the whole stack
                    w[e].copy_((w[e].float() + lora.delta(e)).to(w.dtype))
            with torch.device("meta"):
                plain = Experts(1, 1, 1)
            plain.gate_up_proj, plain.down_proj = m.gate_up_proj, m.down_proj
        _set_module(model, name, plain)
    return model


# ---------------------------------------------------------------- peft's on-disk format

def _layer_suffix(name: str) -> str:
    """model.layers.3.self_attn.q_proj -> self_attn.q_proj: the name peft configs usually list."""
    return re.sub(r"^model\.layers\.\d+\.", "", name)


def _target_list(adapted: list[str], candidates: list[str]) -> list[str]:
    """Suffixes that select exactly `adapted` among `candidates`; full names where a suffix would select more."""
    out = []
    for suffix in sorted({_layer_suffix(n) for n in adapted}):
        hits = [c for c in candidates if _matches([suffix], c)]
        out += [suffix] if set(hits) <= set(adapted) else sorted(n for n in adapted if _layer_suffix(n) == suffix)
    return out


def _expert_keys(name: str, params: list[str]) -> dict[str, str]:
    """Adapted expert parameter -> its key prefix: peft nests one ParamWrapper per parameter, the first
    registered innermost, so each earlier one sits one `base_layer.` deeper."""
    n = len(params)
    return {p: f"{PREFIX}{name}." + "base_layer." * (n - 1 - i) for i, p in enumerate(params)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as peft saves them (float32, on the CPU)."""
    out = {}
    for name, m in lora_modules(model):
        if isinstance(m, LoraLinear):
            out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
            out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
            continue
        for p, key in _expert_keys(name, list(m.lora)).items():
            A, B = m.lora[p].lora_A, m.lora[p].lora_B  # (E, r, in), (E, out, r)
            E, out_f, r = B.shape
            out[f"{key}lora_A.weight"] = A.reshape(E * r, -1)
            out[f"{key}lora_B.weight"] = B.permute(1, 2, 0).reshape(out_f, r * E)
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapters as adapter_config.json + adapter_model.safetensors, which peft loads on the
    transformers model (PeftModel.from_pretrained) and load_adapter loads on a mixr model."""
    mods = list(lora_modules(model))
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    linears = [n for n, m in mods if isinstance(m, LoraLinear)]
    params = {f"{n}.{p}": lora for n, m in mods if isinstance(m, LoraExperts) for p, lora in m.lora.items()}
    adapters = {n: m for n, m in mods if isinstance(m, LoraLinear)} | params
    every = {n: (a.r, a.alpha) for n, a in adapters.items()}
    r, alpha = Counter(every.values()).most_common(1)[0][0]
    rslora = {a.use_rslora for a in adapters.values()}
    if len(rslora) > 1:
        raise ValueError("some adapters use rsLoRA scaling and some do not: peft's format has one use_rslora")
    all_linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLinear))]
    all_params = [f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, (Experts, LoraExperts))
                  for p in EXPERT_PARAMS]
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": rslora.pop(), "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "target_modules": _target_list(linears, all_linear), "target_parameters": _target_list(list(params),
                                                                                                  all_params),
        "rank_pattern": {re.escape(k): v[0] for k, v in every.items() if v[0] != r},
        "alpha_pattern": {re.escape(k): v[1] for k, v in every.items() if v[1] != alpha},
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(adapter_state_dict(model), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


# per-expert (transformers-4) keys: <experts module>.<e>.<proj>.lora_A|B.weight
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(lora_A|lora_B)\.weight$")
_PER_EXPERT_SLOT = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                    "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", None), "w2": ("down_proj", None)}


def read_adapter(adapter_dir: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    path = Path(adapter_dir)
    if not (path / CONFIG_NAME).is_file():
        raise AdapterError(f"no {CONFIG_NAME} in {path}: not a peft adapter directory")
    try:
        raw = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path / CONFIG_NAME} is not valid JSON: {e}") from None
    config = LoraConfig.from_peft(raw, str(path / CONFIG_NAME))
    if not (path / WEIGHTS_NAME).is_file():
        raise AdapterError(f"no {WEIGHTS_NAME} in {path} (adapter_model.bin is not supported)")
    try:
        tensors = load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"cannot read {path / WEIGHTS_NAME}: {e}") from None
    return config, tensors


def _per_expert_to_stacked(tensors: dict[str, torch.Tensor], config: LoraConfig, model: nn.Module, where: str
                           ) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Per-expert adapters -> (experts module, parameter) -> (A (E, r, in), B (E, out, r)) with the scaling
    folded into B (gate and up may differ in rank and alpha)."""
    parts: dict[tuple[str, str], dict] = {}
    for key in [k for k in tensors if _PER_EXPERT.match(k.removeprefix(PREFIX))]:
        module, e, proj, ab = _PER_EXPERT.match(key.removeprefix(PREFIX)).groups()
        module = module.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's transformers-4 name
        param, half = _PER_EXPERT_SLOT[proj]
        parts.setdefault((module, param), {}).setdefault((int(e), half), {})[ab] = (tensors.pop(key), key)
    out = {}
    for (module, param), experts in parts.items():
        try:
            base = model.get_submodule(module)
        except AttributeError:
            base = None
        if not isinstance(base, Experts):
            raise AdapterError(f"{where}: per-expert LoRA for {module}, which is not an experts module of this model")
        E = getattr(base, param).shape[0]
        halves = sorted({h for _, h in experts}, key=lambda h: -1 if h is None else h)
        As, Bs = [], []
        for e in range(E):
            a_parts, b_parts = [], []
            for h in halves:
                got = experts.get((e, h), {})
                if set(got) != {"lora_A", "lora_B"}:
                    raise AdapterError(f"{where}: LoRA of expert {e} of {module} ({param}) is missing "
                                       f"{sorted({'lora_A', 'lora_B'} - set(got)) or 'both'}")
                (A, a_key), (B, _) = got["lora_A"], got["lora_B"]
                _, alpha = config.rank_and_alpha(a_key.removeprefix(PREFIX).rsplit(".lora_A", 1)[0])
                a_parts.append(A.float())
                b_parts.append(B.float() * _scaling(A.shape[0], alpha, config.use_rslora))
            As.append(torch.cat(a_parts))
            Bs.append(torch.block_diag(*b_parts))  # gate rows only see gate's rank, up rows up's
        out[(module, param)] = torch.stack(As), torch.stack(Bs)
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Add the adapters saved in adapter_dir (peft's format) to `model` in place and freeze the base weights.
    Every tensor in the file must find its target (a target without tensors is skipped, with a warning).
    Returns model."""
    path = Path(adapter_dir)
    config, tensors = read_adapter(path)
    where = str(path / WEIGHTS_NAME)
    stacked = _per_expert_to_stacked(tensors, config, model, where)
    linears, experts = _targets(model, config)
    if not linears and not experts and not stacked:
        raise AdapterError(f"{path / CONFIG_NAME}: no module of this model matches target_modules="
                           f"{config.target_modules!r} or target_parameters={config.target_parameters!r}")
    # A target the file has no tensors for is left without an adapter, as peft leaves it (at B = 0): e.g. a
    # transformers-4-era config naming gate_proj for the experts also matches dense MLPs it did not adapt.
    # Tensors that find no target are an error below.
    skipped = [n for n in linears if f"{PREFIX}{n}.lora_A.weight" not in tensors]
    linears = [n for n in linears if n not in skipped]
    for name in list(experts):
        if not any(k.startswith(f"{PREFIX}{name}.") for k in tensors):
            skipped.append(name)
            del experts[name]
    for module, param in stacked:
        experts[module] = [p for p in EXPERT_PARAMS if p in experts.get(module, []) or p == param]
    if not linears and not experts:
        raise AdapterError(f"{where}: no tensor for any target of the config; the file holds e.g. "
                           f"{sorted(tensors)[:3]}")
    if skipped:
        warnings.warn(f"{where}: no tensors for {len(skipped)} modules the config targets, left without an "
                      f"adapter: {skipped[:4]}{' ...' if len(skipped) > 4 else ''}", stacklevel=2)
    _attach(model, config, linears, experts)
    for (module, param), (A, B) in stacked.items():
        # the rank is the stacked one (r_gate + r_up); the scaling is folded into B, so alpha makes it 1
        r = A.shape[1]
        folded = ExpertLora(A.shape[0], A.shape[2], B.shape[1], r, math.sqrt(r) if config.use_rslora else r,
                            config.use_rslora, A.device)
        folded.lora_A.copy_(A)
        folded.lora_B.copy_(B)
        lora = model.get_submodule(module).lora
        lora[param] = folded.to(getattr(model.get_submodule(module), param).device)

    def take(key: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
        if key not in tensors:
            raise AdapterError(f"{where}: tensor {key} is missing (the config targets {what})")
        t = tensors.pop(key)
        if tuple(t.shape) != tuple(shape):
            raise AdapterError(f"{where}: {key} has shape {tuple(t.shape)}, this model and the config's rank "
                               f"imply {tuple(shape)}")
        return t.float()

    for name in linears:
        m = model.get_submodule(name)
        m.lora_A.weight.copy_(take(f"{PREFIX}{name}.lora_A.weight", tuple(m.lora_A.weight.shape), name))
        m.lora_B.weight.copy_(take(f"{PREFIX}{name}.lora_B.weight", tuple(m.lora_B.weight.shape), name))
    for name, params in experts.items():
        m = model.get_submodule(name)
        native = [p for p in params if (name, p) not in stacked]
        for p, key in _expert_keys(name, native).items():
            lora = m.lora[p]
            E, out_f, r = lora.lora_B.shape
            A = take(f"{key}lora_A.weight", (E * r, lora.lora_A.shape[-1]), f"{name}.{p}")
            B = take(f"{key}lora_B.weight", (out_f, r * E), f"{name}.{p}")
            lora.lora_A.copy_(A.view(E, r, -1))
            lora.lora_B.copy_(B.view(out_f, r, E).permute(2, 0, 1))
    if tensors:
        raise AdapterError(f"{where}: {len(tensors)} tensors match no target of this model, e.g. "
                           f"{sorted(tensors)[:3]}")
    for p in lora_parameters(model):
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------- SFT with adapters: `mixr train lora`

def lora_config_from(cfg: TrainConfig) -> LoraConfig:
    kw = {}
    if cfg.lora_target_modules is not None:
        kw["target_modules"] = cfg.lora_target_modules
    if cfg.lora_target_parameters is not None:
        kw["target_parameters"] = list(cfg.lora_target_parameters)
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_r
    return LoraConfig(r=cfg.lora_r, lora_alpha=alpha, **kw)


def lora_model(cfg: TrainConfig, device: torch.device) -> CausalLM:
    """cfg.model with new adapters, or with those of the cfg.resume_from checkpoint. The base is frozen, so it
    is held in the compute dtype (bfloat16 halves its memory); the adapters are float32."""
    base_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = load_model(cfg.model, device=device, dtype=base_dtype, progress=False)
    if cfg.resume_from:
        load_adapter(model, cfg.resume_from)
    else:
        add_lora(model, lora_config_from(cfg), generator=torch.Generator().manual_seed(cfg.seed))
    return model


def save_lora_checkpoint(path: Path, model: CausalLM, optimizer: torch.optim.Optimizer, step: int,
                         cfg: TrainConfig) -> Path:
    """The adapter in peft's format (LLM(cfg.model, adapter=path) serves it) plus trainer_state.pt."""
    save_adapter(model, path, base_model_name_or_path=cfg.model)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": cfg.to_dict()},
               path / "trainer_state.pt")
    return path


def resume_step(cfg: TrainConfig, optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    if not cfg.resume_from:
        return 0
    state = torch.load(Path(cfg.resume_from) / "trainer_state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def train_lora(cfg: TrainConfig) -> CausalLM:
    """SFT of LoRA adapters (next-token loss on the completion tokens, as mode "sft") on a frozen base;
    checkpoint-<step>/ directories hold the adapter and the optimizer state. Returns the model, adapters
    attached (merge_lora folds them in)."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    tokenizer = Tokenizer.from_dir(cfg.tokenizer or cfg.model)
    model = lora_model(cfg, device).train()
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    step = resume_step(cfg, optimizer, device)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [encode_example(tokenizer, row, "sft", cfg.max_len) for row in load_rows(cfg)]
    if not examples:
        raise ValueError("no training examples")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    bar = tqdm(total=cfg.steps, initial=step, desc="lora", disable=not cfg.progress)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [collate([examples[i] for i in batch_indices(len(examples), cfg.batch_size, cfg.seed,
                                                              step * cfg.grad_accum + k)], pad_id)
                 for k in range(cfg.grad_accum)]
        n_targets = sum(m[:, 1:].sum() for _, m, _ in micro).clamp(min=1)
        total = 0.0
        for ids, mask, _ in micro:
            ids, mask = ids.to(device), mask.to(device)
            with autocast:
                logits = model(ids)  # (B, L, V)
            loss = -(token_logprobs(logits[:, :-1], ids[:, 1:]) * mask[:, 1:]).sum() / n_targets.to(device)
            loss.backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        n_tokens = sum(int(real.sum()) for _, _, real in micro)
        record = {"step": step, "loss": total, "lr": lr, "grad_norm": grad_norm.item(),
                  "tokens_per_s": n_tokens / (time.perf_counter() - t0)}
        if step % cfg.log_every == 0 or step == cfg.steps:
            with open(out_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
        bar.update()
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0):
            save_lora_checkpoint(out_dir / f"checkpoint-{step:06d}", model, optimizer, step, cfg)
    bar.close()
    return model
