"""`mixr quantize MODEL_DIR OUT_DIR`: a full-precision checkpoint in, a quantized checkpoint out.

OUT_DIR gets safetensors with the packed tensors, config.json with a `quantization_config`
({"quant_method": "mixr", "bits", "group_size", "zero_point", "method", "modules_to_not_convert"}) and the
tokenizer files, so `LLM(OUT_DIR)` and `load_model(OUT_DIR)` run it as it is.
"""

import shutil
from pathlib import Path

import torch

from mixr.quant.quantize import METHODS, check_widths, quantize_model
from mixr.quant.rtn import QuantSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def default_calibration_text(num_items: int = 300, seed: int = 0) -> str:
    """Built-in calibration text: worked solutions of the task suite's train split (arithmetic, Countdown, word
    problems), so nothing is downloaded. Pass your own text (--calib) for a model of other domains."""
    from mixr.train.tasks import TASKS, generate
    per_task = -(-num_items // len(TASKS))
    items = [it for task in TASKS.values() for it in generate(task, per_task, seed=seed, split="train")]
    items = [items[i] for i in torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()]
    return "\n\n".join(f"{it.prompt}\n{it.solution}" for it in items)


def calibration_ids(tokenizer, text: str, num_seqs: int = 64, seq_len: int = 512) -> torch.Tensor:
    """Token windows (n, L) of `text`: up to num_seqs consecutive windows of seq_len tokens (one shorter window
    when the text is short)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < 32:
        raise ValueError(f"the calibration text has {len(ids)} tokens; give at least 32 (a few thousand is typical)")
    L = min(seq_len, len(ids))
    n = min(num_seqs, len(ids) // L)
    return torch.tensor(ids[:n * L]).view(n, L)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, bits: int = 4, group_size: int | None = None,
                        method: str = "rtn", zero_point: bool = False, calib: str | Path | None = None,
                        device: str | None = None, num_calib_seqs: int = 64, calib_seq_len: int = 512,
                        progress: bool = True) -> dict:
    """Quantize the checkpoint in model_dir into out_dir. group_size: int4 only, default 128. method "gptq"
    calibrates on the text file `calib` (default: `default_calibration_text()`). Returns a summary dict.

    Raises CheckpointError for an already-quantized checkpoint and ValueError for a bad format or a layer whose
    width does not split into groups, before any weight is read."""
    from mixr.checkpoint import CheckpointError, load_model, read_config, save_model
    from mixr.models import config_from_hf
    from mixr.tokenizer import Tokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf = read_config(model_dir)
    if hf.get("quantization_config") is not None:
        qc = hf["quantization_config"]
        kind = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"{model_dir} is already quantized (quantization_config.quant_method {kind!r}); "
                              "quantize the full-precision checkpoint instead")
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; use one of {', '.join(METHODS)}")
    spec = QuantSpec(bits, (group_size or 128) if bits == 4 else group_size, zero_point)
    if calib is not None and method != "gptq":
        raise ValueError("a calibration text (--calib) is used by --method gptq only")
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        raise ValueError("OUT_DIR must differ from MODEL_DIR")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty")
    try:
        config = config_from_hf(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{model_dir / 'config.json'}: {e}") from None
    with torch.device("meta"):
        check_widths(config.build(), spec)  # fail before reading gigabytes of weights
    text = None
    if method == "gptq":
        text = Path(calib).read_text(encoding="utf-8") if calib is not None else default_calibration_text()

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_dir, device=device, progress=progress)
    before = weight_bytes(model)
    calib_ids = None
    if text is not None:
        calib_ids = calibration_ids(Tokenizer.from_dir(model_dir), text, num_calib_seqs, calib_seq_len)
    qc = quantize_model(model, method, bits, spec.group_size, zero_point, calib_ids, progress=progress)
    save_model(model, out_dir)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out_dir / name)
    return {"quantization_config": qc, "weight_bytes": weight_bytes(model), "weight_bytes_before": before,
            "calibration_tokens": 0 if calib_ids is None else calib_ids.numel()}
