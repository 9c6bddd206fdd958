"""The built-in default model, and a tiny random DeepSeek-V3-architecture checkpoint in the Hugging Face format.

The default model is the trained one shipped in mixr/default_model/ (recipes/default_model/, made by
bench/train_default_model.py). Without it (a checkout that lacks the weights) the tiny random checkpoint stands
in: it exercises the whole stack (MLA, sigmoid group-limited routing, shared experts, BPE tokenizer, R1 chat
template) but its text is noise.
"""

import json
import os
import sys
from pathlib import Path

import torch

from mixr.checkpoint import save_model
from mixr.models import config_from_hf
from mixr.tiny_tokenizer import build_tokenizer
from mixr.tokenizer import Tokenizer


def tiny_deepseek_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "n_group": 2, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": "float32",
    }


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Write tokenizer files, config.json, generation_config.json and random weights into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tok = Tokenizer.from_dir(out)  # the trained tokenizer tells us vocab size and special ids
    bos, eos = tok.bos_token_id, tok.eos_token_id
    hf = tiny_deepseek_config(tok.vocab_size, bos, eos)
    config = config_from_hf(hf)
    model = config.build()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(seed))
    save_model(model, out)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": [eos], "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2))
    return out


DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model_dir() -> Path:
    """The model used when no directory is given: the trained default model in mixr/default_model/, or, when it
    is not installed, a tiny random model made once under ~/.cache/mixr (or $MIXR_HOME), saying so on stderr."""
    if (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        return DEFAULT_MODEL_DIR
    home = Path(os.environ.get("MIXR_HOME") or Path.home() / ".cache" / "mixr")
    path = home / "tiny-random-deepseek-v3"
    print(f"mixr: the trained default model is not installed ({DEFAULT_MODEL_DIR} has no weights); using a tiny "
          f"random DeepSeek-V3-style model from {path} instead (random weights: its output is noise)",
          file=sys.stderr)
    if not (path / "model.safetensors").is_file():
        make_tiny_checkpoint(path)
    return path
