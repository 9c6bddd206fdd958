"""Hugging Face checkpoint directories: config.json + *.safetensors (optionally sharded with an index).

Loading builds the model on the meta device and streams each tensor from the memory-mapped files straight into
its final dtype and device, so a model is never materialised twice. Per-expert tensors
(`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`, ...) are copied into the
stacked `experts.gate_up_proj` / `experts.down_proj` parameters as they arrive.

Quantized checkpoints (config.json `quantization_config`):
  quant_method "mixr"  written by `mixr quantize`: packed `<linear>.qweight/.scales[/.zeros]` and stacked
                       `mlp.experts.gate_up_proj.qweight/...`, loaded into QuantLinear / QuantExperts modules.
  quant_method "fp8"   DeepSeek-V3/R1's float8_e4m3fn weights with block `weight_scale_inv` tensors: dequantized
                       to the load dtype as they arrive (per expert, before stacking), or kept as Fp8Linear
                       modules with quantization="fp8".
"""

import json
import re
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from mixr.layers.moe import Experts
from mixr.models import config_from_hf
from mixr.models.base import CausalLM, init_parameter_
from mixr.parallel import shard_model, shard_of
from mixr.quant.fp8 import dequantize_fp8
from mixr.quant.modules import Fp8Linear
from mixr.quant.quantize import auto_group_size, empty_quant_module, quantize_model, replace_module
from mixr.quant.rtn import QuantSpec


class CheckpointError(ValueError):
    """A model directory that cannot be loaded; the message names the file or tensor at fault."""


_EXPERT_KEY = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
# slot in the stacked tensors: (parameter, half of gate_up_proj or None)
_EXPERT_SLOT = {"gate_proj": ("gate_up_proj", 0), "w1": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                "w3": ("gate_up_proj", 1), "down_proj": ("down_proj", None), "w2": ("down_proj", None)}
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
QUANTIZATIONS = ("int8", "int4", "fp8")
LOAD_FORMATS = ("safetensors", "dummy")
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


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


def parse_config(hf: dict, model_dir: str | Path):
    """The model config of config.json's contents `hf`; CheckpointError for an architecture or field mixr cannot
    build."""
    try:
        return config_from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(model_dir) / 'config.json'}: {e}") from None


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


def quantization_config(hf: dict, model_dir: str | Path) -> dict | None:
    """config.json's quantization_config, checked: quant_method "mixr" (a valid format) or "fp8" (e4m3 blocks)."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    where = f"{Path(model_dir) / 'config.json'}: quantization_config"
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where} is not an object")
    method = qc.get("quant_method")
    if method == "mixr":
        try:
            QuantSpec(qc.get("bits"), qc.get("group_size"), bool(qc.get("zero_point", False)))
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None
    elif method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(f"{where}: fmt {qc['fmt']!r} is not supported (e4m3)")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise CheckpointError(f"{where}: activation_scheme {qc['activation_scheme']!r} is not supported (dynamic)")
        block = qc.get("weight_block_size", [128, 128])
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{where}: weight_block_size must be two positive integers, got {block!r}")
    else:
        raise CheckpointError(f"{where}: quant_method {method!r} is not supported (mixr, fp8)")
    return qc


def _swap_quantized_modules(model: CausalLM, files: dict, qc: dict, fp8_native: bool, dtype: torch.dtype) -> None:
    """Replace the meta-device modules whose checkpoint tensors are quantized: QuantLinear / QuantExperts where
    the checkpoint has `.qweight` keys, Fp8Linear where it has `.weight_scale_inv` (fp8_native)."""
    spec = QuantSpec(qc["bits"], qc.get("group_size"), bool(qc.get("zero_point"))) if qc["quant_method"] == "mixr" \
        else None
    for name, m in list(model.model.layers.named_modules(prefix="model.layers")):
        if spec is not None and (f"{name}.qweight" in files or f"{name}.gate_up_proj.qweight" in files) \
                and isinstance(m, (nn.Linear, Experts)):
            try:
                replace_module(model, name, empty_quant_module(m, spec, dtype, "meta", name))
            except ValueError as e:
                raise CheckpointError(f"{e} (quantization_config group_size)") from None
        elif fp8_native and isinstance(m, nn.Linear) and f"{name}.weight_scale_inv" in files \
                and not name.endswith("kv_b_proj"):  # MLA's absorbed decode reads kv_b_proj as a dense matrix
            replace_module(model, name, Fp8Linear(m.in_features, m.out_features, m.bias is not None, dtype, "meta",
                                            tuple(qc.get("weight_block_size", (128, 128)))))


def _load_dtype(target: str, ref: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Floating tensors load in `dtype`; packed integers, FP8 weights, their float32 block scales and DeepSeek-V3's
    float32 correction bias keep the dtype of the module's own buffer."""
    if ref.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return ref.dtype
    if target.endswith(("correction_bias", "weight_scale_inv")):
        return ref.dtype
    return dtype


def _half(t: torch.Tensor, half: int | None) -> torch.Tensor:
    """One expert's slot for a gate (0) or up (1) tensor in its gate_up_proj rows, or the whole of down_proj."""
    if half is None:
        return t
    rows = t.shape[0] // 2
    return t[half * rows:(half + 1) * rows]


@torch.no_grad()
def _dummy_weights(model: CausalLM, full: dict, expected: dict, shard: tuple | None, device, dtype) -> None:
    """load_format="dummy": each parameter as init_weights makes it (std 0.02), drawn whole on `device` from a
    generator seeded by its name, then cut to this rank's shard; persistent buffers (DeepSeek-V3's
    e_score_correction_bias) zero, as a fresh build makes them."""
    params = dict(model.named_parameters())
    for name, ref in expected.items():
        if not ref.is_meta:  # non-persistent buffers, made at build time
            continue
        t = torch.empty(full[name].shape, device=device, dtype=_load_dtype(name, ref, dtype))
        if name in params:
            init_parameter_(name, t, 0.02, torch.Generator(device).manual_seed(zlib.crc32(name.encode())))
        else:
            t.zero_()
        if shard is not None:
            t = shard_of(name, t, ref.shape, shard[0], shard[1]).contiguous()
        _set(model, name, t)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, progress: bool = True,
               quantization: str | None = None, shard: tuple | None = None,
               load_format: str = "safetensors") -> CausalLM:
    """Build the model for config.json on the meta device and load its safetensors weights onto `device`.

    quantization: None loads the checkpoint as stored (a `mixr quantize` directory into its quantized modules;
    an FP8 checkpoint dequantized to `dtype`). "int8" / "int4" quantize a full-precision checkpoint on load
    (round-to-nearest; int4 symmetric with the largest group size of 128/64/32 that fits every layer).
    "fp8" keeps an FP8 checkpoint's weights in FP8 (Fp8Linear; routed experts are still dequantized).

    shard: (rank, world_size, experts[, attention]) loads only that rank's shard (mixr.parallel.shard_model,
    applied to the meta-device model; each tensor is cut with shard_of as it is read), so no process ever holds
    the whole model. load_format "dummy" (vLLM's name) reads config.json only and makes random weights as
    CausalLM.init_weights does, each from a generator seeded by its name and then cut to the shard: every rank
    and every world_size holds the same model. It is for benchmarks of shapes whose checkpoint is too large to
    write."""
    model_dir = Path(model_dir)
    hf = read_config(model_dir)
    if quantization not in (None, *QUANTIZATIONS):
        raise ValueError(f"unsupported quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unsupported load_format {load_format!r}; use one of {', '.join(LOAD_FORMATS)}")
    qc = quantization_config(hf, model_dir)
    if load_format == "dummy" and qc is not None:
        raise CheckpointError(f"load_format='dummy' makes full-precision weights; {model_dir / 'config.json'} "
                              "has a quantization_config")
    method = qc["quant_method"] if qc else None
    if quantization in ("int8", "int4") and qc is not None:
        raise CheckpointError(f"{model_dir} is already quantized (quantization_config.quant_method {method!r}); "
                              f"load it without quantization={quantization!r}")
    if quantization == "fp8" and method != "fp8":
        raise CheckpointError(f"quantization='fp8' runs checkpoints stored in FP8 (quantization_config.quant_method "
                              f"'fp8', as DeepSeek-V3/R1 ship); {model_dir} is not one: use 'int8' or 'int4'")
    config = parse_config(hf, model_dir)
    dtype = resolve_dtype(dtype, hf)
    with torch.device("meta"):
        model = config.build()
    files = _shards(model_dir) if load_format == "safetensors" else {}
    fp8_block = tuple(qc.get("weight_block_size", (128, 128))) if method == "fp8" else None
    if qc is not None:
        _swap_quantized_modules(model, files, qc, quantization == "fp8", dtype)
    if method == "fp8" and quantization != "fp8":  # dequantized: what is loaded is a plain checkpoint
        config.hf = {k: v for k, v in hf.items() if k != "quantization_config"}
    full = dict(model.named_parameters()) | dict(model.named_buffers())
    if shard is not None:
        rank, world_size, experts, *attention = shard
        # on the meta device: only the shapes change
        shard_model(model, rank, world_size, experts, attention=attention[0] if attention else "tp")
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    dropped = full.keys() - expected.keys()  # row-parallel biases, which rank 0 alone adds
    if load_format == "dummy":
        _dummy_weights(model, full, expected, shard, device, dtype)
    handles: dict[Path, object] = {}
    stacked: dict[str, torch.Tensor] = {}
    filled: dict[str, set] = {}
    loaded: set[str] = set()
    unexpected = []
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    bar = tqdm(total=len(files), desc="Loading weights", unit="tensor",
               disable=not progress or len(by_file) < 2)

    def read(name: str, path: Path) -> torch.Tensor:
        if path not in handles:
            handles[path] = _open(path)
        try:
            return handles[path].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from None

    for path, names in sorted(by_file.items()):
        for name in names:
            bar.update()
            if _skip(name, config.num_hidden_layers):
                continue
            target, expert, half = _target(name, config.model_type)
            if target not in expected:
                if not name.endswith(".weight_scale_inv") and target not in dropped:  # scales: read with weights
                    unexpected.append(name)
                continue
            tensor = read(name, path)
            ref = expected[target]
            if tensor.dtype in _FLOAT8 and ref.dtype not in _FLOAT8:
                scale_name = name.removesuffix("weight") + "weight_scale_inv"
                if scale_name not in files:
                    raise CheckpointError(f"{name} in {path.name} is {tensor.dtype} but its block scales "
                                          f"{scale_name} are not in {model_dir}")
                try:
                    tensor = dequantize_fp8(tensor, read(scale_name, files[scale_name]), fp8_block or (128, 128),
                                            torch.float32)
                except ValueError as e:
                    raise CheckpointError(f"{scale_name}: {e}") from None
            want_dtype = _load_dtype(target, ref, dtype)
            if expert is None:
                if tuple(tensor.shape) != tuple(full[target].shape):
                    raise CheckpointError(f"{name} in {path.name} has shape {tuple(tensor.shape)}, "
                                          f"the config implies {tuple(full[target].shape)}")
                if shard is not None:
                    tensor = shard_of(target, tensor, ref.shape, rank, world_size)
                _set(model, target, tensor.to(device=device, dtype=want_dtype))
                loaded.add(target)
                continue
            whole = _half(full[target][0], half)
            if tuple(tensor.shape) != tuple(whole.shape):
                raise CheckpointError(f"{name} in {path.name} has shape {tuple(tensor.shape)}, "
                                      f"the config implies {tuple(whole.shape)}")
            # expert parallel: this rank's experts are [first, first + E_local)
            expert -= getattr(model.get_submodule(target.rpartition(".")[0]), "first", 0)
            if not 0 <= expert < ref.shape[0]:
                continue
            if target not in stacked:
                stacked[target] = torch.empty(ref.shape, device=device, dtype=dtype)
                filled[target] = set()
            dest = _half(stacked[target][expert], half)
            if shard is not None:
                tensor = shard_of(name, tensor, dest.shape, rank, world_size)
            dest.copy_(tensor)
            filled[target].add((expert, half))
    bar.close()
    handles.clear()
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
    if quantization in ("int8", "int4"):
        bits = int(quantization[3:])
        try:
            quantize_model(model, "rtn", bits, auto_group_size(model) if bits == 4 else None)
        except ValueError as e:
            raise CheckpointError(f"{model_dir}: cannot quantize to {quantization}: {e}") from None
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
    dtype = model.lm_head.weight.dtype  # quantized checkpoints hold integer tensors too; this is the model's
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
