"""Hugging Face checkpoint directories: config.json + *.safetensors (optionally sharded with an index).

Loading builds the model on the meta device and streams each tensor from the memory-mapped files straight into
its final dtype and device, so a model is never materialised twice. Per-expert tensors
(`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`, ...) are copied into the
stacked `experts.gate_up_proj` / `experts.down_proj` parameters as they arrive.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from mixr.models import config_from_hf
from mixr.models.base import CausalLM


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file or tensor at fault."""


_EXPERT_KEY = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# slot in the stacked tensors: (parameter, half of gate_up_proj or None)
_EXPERT_SLOT = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", None), "w2": ("down_proj", None)}
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"no config.json in {path}: not a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None


def resolve_dtype(dtype: str | torch.dtype | None, hf: dict) -> torch.dtype:
    """None / "auto" -> the checkpoint's own dtype (config `dtype` or `torch_dtype`), float32 when unstated."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _shards(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or by listing every *.safetensors file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from None
        files = {n: model_dir / f for n, f in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{index} lists {f.name}, which is missing from {model_dir}")
        return files
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no *.safetensors weights in {model_dir} (.bin/.pt checkpoints are not supported)")
    files = {}
    for f in found:
        for name in _open(f).keys():
            files[name] = f
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e} (truncated or corrupt safetensors file?)") from None


def _target(name: str, model_type: str) -> tuple[str, int | None, int | None]:
    """Checkpoint key -> (parameter name, expert index, half of gate_up_proj)."""
    if model_type == "mixtral":
        name = name.replace(".block_sparse_moe.", ".mlp.")
    m = _EXPERT_KEY.match(name)
    if m is None:
        return name, None, None
    param, half = _EXPERT_SLOT[m.group(3)]
    return f"{m.group(1)}.experts.{param}", int(m.group(2)), half


def _skip(name: str, num_layers: int) -> bool:
    """Tensors a checkpoint may carry that inference does not use."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    # DeepSeek-V3's multi-token-prediction module is stored as layer num_hidden_layers (and beyond).
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= num_layers


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, progress: bool = True) -> CausalLM:
    """Build the model for config.json on the meta device and load its safetensors weights onto `device`."""
    model_dir = Path(model_dir)
    hf = read_config(model_dir)
    try:
        config = config_from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: {e}") from None
    dtype = resolve_dtype(dtype, hf)
    with torch.device("meta"):
        model = config.build()
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    files = _shards(model_dir)
    stacked: dict[str, torch.Tensor] = {}
    filled: dict[str, set] = {}
    loaded: set[str] = set()
    unexpected = []
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    bar = tqdm(total=len(files), desc="Loading weights", unit="tensor",
               disable=not progress or len(by_file) < 2)
    for path, names in sorted(by_file.items()):
        handle = _open(path)
        for name in names:
            bar.update()
            if _skip(name, config.num_hidden_layers):
                continue
            target, expert, half = _target(name, config.model_type)
            if target not in expected:
                unexpected.append(name)
                continue
            try:
                tensor = handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None
            ref = expected[target]
            want_dtype = ref.dtype if ref.dtype == torch.float32 and target.endswith("correction_bias") else dtype
            if expert is None:
                if tuple(tensor.shape) != tuple(ref.shape):
                    raise CheckpointError(f"{name} in {path.name} has shape {tuple(tensor.shape)}, "
                                          f"the config implies {tuple(ref.shape)}")
                _set(model, target, tensor.to(device=device, dtype=want_dtype))
                loaded.add(target)
                continue
            if target not in stacked:
                stacked[target] = torch.empty(ref.shape, device=device, dtype=dtype)
                filled[target] = set()
            dest = stacked[target][expert]
            if half is not None:
                rows = dest.shape[0] // 2
                dest = dest[half * rows:(half + 1) * rows]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise CheckpointError(f"{name} in {path.name} has shape {tuple(tensor.shape)}, "
                                      f"the config implies {tuple(dest.shape)}")
            dest.copy_(tensor)
            filled[target].add((expert, half))
    bar.close()
    for target, t in stacked.items():
        num_experts = t.shape[0]
        halves = (0, 1) if target.endswith("gate_up_proj") else (None,)
        missing = [(e, h) for e in range(num_experts) for h in halves if (e, h) not in filled[target]]
        if missing:
            e, h = missing[0]
            part = {0: "gate_proj", 1: "up_proj", None: "down_proj"}[h]
            raise CheckpointError(f"{model_dir}: tensor for expert {e} {part} of {target} is missing "
                                  f"({len(missing)} expert tensors missing in all)")
        _set(model, target, t)
        loaded.add(target)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        import warnings
        warnings.warn(f"{model_dir}: ignored {len(unexpected)} tensors the model does not use, e.g. {unexpected[:3]}")
    # Non-persistent buffers (rotary frequencies) were made on the CPU at build time.
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != torch.device(device):
                module._buffers[key] = buf.to(device)
    return model


def state_dict_for_hf(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under the checkpoint keys publishers use: one tensor per expert projection."""
    mixtral = model.config.model_type == "mixtral"
    names = {"gate": "w1", "up": "w3", "down": "w2"} if mixtral else \
        {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    out = {}
    for name, t in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            if mixtral:
                prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    gate, up = t[e].chunk(2)
                    out[f"{prefix}.{e}.{names['gate']}.weight"] = gate.contiguous()
                    out[f"{prefix}.{e}.{names['up']}.weight"] = up.contiguous()
                else:
                    out[f"{prefix}.{e}.{names['down']}.weight"] = t[e].contiguous()
        else:
            out[name] = t.contiguous()
    return out


def save_model(model: CausalLM, out_dir: str | Path, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors (sharded with an index past max_shard_bytes) that mixr and
    transformers both load."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu() for k, v in state_dict_for_hf(model).items()}
    dtype = next(iter(tensors.values())).dtype
    hf = dict(model.config.hf)
    hf["dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
