"""Tiny random checkpoints written by transformers (the reference), shared by the tests."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

VOCAB = 512

MOE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)
MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96,
           moe_intermediate_size=24, first_k_dense_replace=1, n_shared_experts=2, num_experts_per_tok=3)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}

# name -> (model_type, config kwargs). Each is a non-default corner the loader and model must get right.
FAMILIES = {
    "deepseek_v3_noaux_tc": ("deepseek_v3", dict(**MOE, **MLA, n_routed_experts=16, n_group=4, topk_group=2,
                                                  q_lora_rank=48, norm_topk_prob=True, routed_scaling_factor=2.5)),
    "deepseek_v3_yarn_no_qlora": ("deepseek_v3", dict(**MOE, **MLA, n_routed_experts=8, n_group=2, topk_group=1,
                                                       q_lora_rank=None, norm_topk_prob=False,
                                                       rope_scaling=YARN, rope_theta=10000.0)),
    "deepseek_v2_greedy": ("deepseek_v2", dict(**MOE, **MLA, n_routed_experts=8, topk_method="greedy",
                                                q_lora_rank=None, routed_scaling_factor=1.0)),
    "deepseek_v2_group_limited_yarn": ("deepseek_v2", dict(**MOE, **MLA, n_routed_experts=16, n_group=4, topk_group=2,
                                                            topk_method="group_limited_greedy", q_lora_rank=40,
                                                            routed_scaling_factor=16.0, rope_scaling=YARN,
                                                            rope_theta=10000.0)),
    "qwen2_moe": ("qwen2_moe", dict(**MOE, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False)),
    "qwen3_moe": ("qwen3_moe", dict(**MOE, num_key_value_heads=2, head_dim=24, intermediate_size=96,
                                    moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=True, mlp_only_layers=[0])),
    "mixtral": ("mixtral", dict(**MOE, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                                num_experts_per_tok=2)),
    "olmoe": ("olmoe", dict(**MOE, num_key_value_heads=2, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                            clip_qkv=3.0, eos_token_id=1, pad_token_id=0)),
    "llama_rope_llama3": ("llama", dict(**MOE, num_key_value_heads=2, intermediate_size=96,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                                        rope_theta=500000.0)),
    "qwen2_tied": ("qwen2", dict(**MOE, num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(**MOE, num_key_value_heads=1, head_dim=32, intermediate_size=96)),
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that routing and attention matter (HF's 0.02 init gives near-uniform outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if "norm" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            elif "e_score_correction_bias" in name:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.5 / t.shape[-1] ** 0.5 if t.dim() > 1 else 0.1))


def forced_gaps(model, prompts: list[list[int]], outputs: list[list[int]]) -> torch.Tensor:
    """How far below its best logit the reference forward of `model` puts each token the engine chose, run on the
    engine's own tokens (teacher forcing). Greedy paths of two implementations part at the first near-tie and
    then compare unrelated text; this stays a per-token check of the kernels. A random tiny model's bf16 logits
    tie exactly now and then, so 0 everywhere is too strict and agreement of whole sequences measures luck."""
    gaps = []
    dev = model.lm_head.weight.device
    with torch.inference_mode():
        for p, out in zip(prompts, outputs):
            logits = model(torch.tensor([p + out], device=dev))[0, len(p) - 1:-1].float()
            gaps.append(logits.max(-1).values - logits[torch.arange(len(out)), torch.tensor(out, device=dev)])
    return torch.cat(gaps)


def make_hf_checkpoint(path: Path, model_type: str, kwargs: dict, seed: int = 0, shard: str | None = None) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from mixr.tiny_tokenizer import build_tokenizer

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    # Publishers write transformers-4 keys (rope_theta + rope_scaling with "type"); keep that form where a test
    # passed it, so both config styles are exercised.
    if "rope_scaling" in kwargs:
        cfg = json.loads((path / "config.json").read_text())
        cfg.pop("rope_parameters", None)
        cfg["rope_scaling"], cfg["rope_theta"] = kwargs["rope_scaling"], kwargs["rope_theta"]
        (path / "config.json").write_text(json.dumps(cfg))
    build_tokenizer(path, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> directory of that FAMILIES entry, built once per session."""
    made = {}

    def get(name: str, shard: str | None = None) -> Path:
        key = (name, shard)
        if key not in made:
            model_type, kwargs = FAMILIES[name]
            made[key] = make_hf_checkpoint(tmp_path_factory.mktemp(name), model_type, kwargs, shard=shard)
        return made[key]

    return get


def start_mixr_serve(args: list[str], log_path: Path, env: dict | None = None):
    """`python -m mixr serve *args --port P` on a free loopback port, its output in log_path, this checkout first on
    PYTHONPATH; returns (process, base URL, the open log file) once /health answers 200, asserting with the log
    that the process lives and answers within 60 s. The caller stops the process and closes the log."""
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **(env or {})}
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "mixr", "serve", *args, "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, open(log_path).read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return proc, base, log
            time.sleep(0.2)
    except BaseException:
        proc.kill()
        proc.wait()
        log.close()
        raise
