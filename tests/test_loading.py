"""Bad checkpoints fail with a message naming the file or tensor; mixr-saved checkpoints load in transformers."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VOCAB
from mixr import CheckpointError, load_model, save_model


@pytest.fixture
def copy(checkpoint, tmp_path):
    def make(name: str = "deepseek_v3_noaux_tc"):
        dst = tmp_path / "model"
        shutil.copytree(checkpoint(name), dst)
        return dst
    return make


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found: .*nope"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_model_type(copy):
    path = copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported model_type 'gpt2'; supported: deepseek_v2, deepseek_v3"):
        load_model(path)


def test_truncated_safetensors(copy):
    path = copy()
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*(truncated or corrupt|cannot read)"):
        load_model(path)


def test_missing_tensor(copy):
    path = copy()
    f = path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"missing tensor model.layers.2.self_attn.kv_b_proj.weight"):
        load_model(path)


def test_missing_expert(copy):
    path = copy()
    f = path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"expert 5 up_proj of model.layers.1.mlp.experts.gate_up_proj"):
        load_model(path)


def test_shape_mismatch(copy):
    path = copy()
    cfg = json.loads((path / "config.json").read_text())
    cfg["kv_lora_rank"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.kv_a_layernorm.weight in model.safetensors "
                                              r"has shape \(32,\), the config implies \(16,\)"):
        load_model(path)


def test_index_names_missing_shard(checkpoint, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(checkpoint("deepseek_v3_noaux_tc", shard="40KB"), dst)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim.name}, which is missing"):
        load_model(dst)


def test_invalid_config_json(copy):
    path = copy()
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(path)


@pytest.mark.parametrize("name", ["deepseek_v3_noaux_tc", "mixtral", "qwen2_moe", "qwen2_tied"])
def test_saved_checkpoint_loads_in_transformers(name, checkpoint, tmp_path):
    """save_model writes per-expert keys as publishers do; transformers reads it back to the same logits."""
    from transformers import AutoModelForCausalLM
    ours = load_model(checkpoint(name), dtype=torch.float32)
    save_model(ours, tmp_path / "out", max_shard_bytes=50_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, ours(ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(load_model(tmp_path / "out", dtype=torch.float32)(ids), ours(ids))


def test_cli_reports_errors_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mixr", "generate", str(tmp_path / "missing"), "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"mixr: error: model directory not found: {tmp_path / 'missing'}"
