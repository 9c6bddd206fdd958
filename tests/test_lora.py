"""LoRA: peft's on-disk format both ways (peft on the transformers model is the reference), merging, training
adapters on a frozen base, and serving a base model with an adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixr import LLM, SamplingParams, load_model, save_model
from mixr.layers.moe import Experts
from mixr.train.config import TrainConfig
from mixr.train.lora import (AdapterError, LoraConfig, LoraExperts, LoraLinear, adapters_disabled, add_lora,
                             load_adapter, lora_modules, lora_parameters, merge_lora, save_adapter, train_lora)
from mixr.train.tasks import TASKS, generate

peft = pytest.importorskip("peft")

FAMILIES = ["deepseek_v3_noaux_tc", "qwen2_moe", "mixtral"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds spin-waiting on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ids_for(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(seed))


def randomize_adapters_(model, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero A and B everywhere (a new adapter has B = 0, which would hide layout mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_close(a, b, what: str):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=what)


# ---------------------------------------------------------------- peft's format, both ways

@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_a_mixr_adapter(checkpoint, family, tmp_path):
    path = checkpoint(family)
    model = load_model(path, dtype=torch.float32)
    names = add_lora(model, LoraConfig(r=4, lora_alpha=8))  # every attention projection and the experts
    assert any(n.endswith("experts.gate_up_proj") for n in names) and any(n.endswith("o_proj") for n in names)
    randomize_adapters_(model)
    ids = ids_for()
    ours = logits(model, ids)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))

    from peft import PeftModel
    base = hf_model(path)
    base_logits = logits(base, ids)
    ref = logits(PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), ids)
    assert (ref - base_logits).abs().max() > 0.1  # the adapter matters, so agreement below means something
    assert_close(ours, ref, f"{family}: mixr with its adapter vs peft with the saved adapter")


@pytest.mark.parametrize("family", FAMILIES)
def test_mixr_loads_a_peft_adapter(checkpoint, family, tmp_path):
    """peft writes the adapter (random A and B, one module with its own rank and alpha, rsLoRA scaling on one
    family); mixr loads it onto its own model and gives peft's logits."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    path = checkpoint(family)
    attn = ["q_a_proj", "kv_b_proj", "o_proj"] if family.startswith("deepseek") else ["q_proj", "v_proj", "o_proj"]
    cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=attn,
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                         rank_pattern={"layers.1.self_attn.o_proj": 6}, alpha_pattern={"layers.1.self_attn.o_proj": 3},
                         use_rslora=family == "mixtral", init_lora_weights=False)
    torch.manual_seed(0)
    pm = get_peft_model(hf_model(path), cfg).eval()
    ids = ids_for(1)
    ref = logits(pm, ids)
    pm.save_pretrained(tmp_path / "adapter")

    model = load_adapter(load_model(path, dtype=torch.float32), tmp_path / "adapter")
    o_proj = model.get_submodule("model.layers.1.self_attn.o_proj")
    assert isinstance(o_proj, LoraLinear) and o_proj.r == 6 and o_proj.alpha == 3
    assert any(isinstance(m, LoraExperts) and set(m.lora) == {"gate_up_proj", "down_proj"}
               for _, m in lora_modules(model))
    with adapters_disabled(model):
        assert (logits(model, ids) - ref).abs().max() > 0.1
    assert_close(logits(model, ids), ref, f"{family}: mixr with peft's adapter vs peft")


def test_round_trip_keeps_every_tensor(checkpoint, tmp_path):
    """save -> load -> save writes the same tensors and config: layouts are each other's inverse."""
    path = checkpoint("deepseek_v3_noaux_tc")
    model = load_model(path, dtype=torch.float32)
    add_lora(model, LoraConfig(r=3, lora_alpha=5, rank_pattern={r"layers\.2\.mlp\.experts\.down_proj": 2}))
    randomize_adapters_(model)
    save_adapter(model, tmp_path / "a")
    again = load_adapter(load_model(path, dtype=torch.float32), tmp_path / "a")
    save_adapter(again, tmp_path / "b")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg == json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {r"model\.layers\.2\.mlp\.experts\.down_proj": 2}
    # peft's nesting: gate_up_proj is the inner wrapper (base_layer), down_proj the outer one
    E, H, I = 16, 64, 24
    assert a["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"].shape == (3 * E, H)
    assert a["base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"].shape == (2 * I, 3 * E)
    assert a["base_model.model.model.layers.2.mlp.experts.lora_A.weight"].shape == (2 * E, I)
    assert a["base_model.model.model.layers.1.self_attn.q_a_proj.lora_B.weight"].shape == (48, 3)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys")  # peft's own conversion
def test_per_expert_adapter_as_peft_converts_it(checkpoint, tmp_path):
    """A transformers-4-style adapter (one LoRA per expert Linear, gate/up/down) loads as peft's own conversion
    to the stacked experts reads it, and equals the per-expert weights merged by hand."""
    from peft import PeftModel
    path = checkpoint("deepseek_v3_noaux_tc")
    E, H, I, r = 16, 64, 24, 2
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for layer in (1, 2):
        for e in range(E):
            for proj, (n_in, n_out) in {"gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}.items():
                key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.3
    out = tmp_path / "adapter"
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 6, "target_modules": ["gate_proj", "up_proj", "down_proj"],
         "task_type": "CAUSAL_LM", "base_model_name_or_path": str(path)}))
    ids = ids_for(2)
    # the config's gate_proj also names layer 0's dense MLP and the shared experts, which the file leaves out
    with pytest.warns(UserWarning, match="model.layers.0.mlp.gate_proj"):
        ours = logits(load_adapter(load_model(path, dtype=torch.float32), out), ids)
    ref = logits(PeftModel.from_pretrained(hf_model(path), out).eval(), ids)
    assert_close(ours, ref, "per-expert adapter: mixr vs peft's conversion")

    # by hand: W_e += 3 B_e A_e on the per-expert tensors
    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in (1, 2):
            experts = model.get_submodule(f"model.layers.{layer}.mlp.experts")
            for e in range(E):
                key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}"
                d = {proj: 3.0 * tensors[f"{key}.{proj}.lora_B.weight"] @ tensors[f"{key}.{proj}.lora_A.weight"]
                     for proj in ("gate_proj", "up_proj", "down_proj")}
                experts.gate_up_proj[e] += torch.cat([d["gate_proj"], d["up_proj"]])
                experts.down_proj[e] += d["down_proj"]
    assert_close(ours, logits(model, ids), "per-expert adapter: mixr vs merged by hand")
    # one expert's tensors missing is an error, not a silent zero
    del tensors["base_model.model.model.layers.2.mlp.experts.5.up_proj.lora_B.weight"]
    save_file(tensors, out / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="expert 5 of model.layers.2.mlp.experts"):
        load_adapter(load_model(path, dtype=torch.float32), out)


# ---------------------------------------------------------------- merging and the base

@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged(checkpoint, family, tmp_path):
    path = checkpoint(family)
    model = load_model(path, dtype=torch.float32)
    base_keys = set(model.state_dict())
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "lm_head", "shared_expert.up_proj",
                                                                  "shared_experts.down_proj"]))
    randomize_adapters_(model)
    ids = ids_for(3)
    unmerged = logits(model, ids)
    with adapters_disabled(model):
        base = logits(model, ids)
    assert (unmerged - base).abs().max() > 0.1
    merge_lora(model)
    assert not list(lora_modules(model))
    assert all(type(m) in (torch.nn.Linear, Experts) for n, m in model.named_modules()
               if n.endswith(("o_proj", "lm_head", "mlp.experts")))
    assert set(model.state_dict()) == base_keys  # the plain model again: save_model and the engine take it
    assert_close(logits(model, ids), unmerged, f"{family}: merged vs unmerged")
    # and transformers reads the merged checkpoint as the same model
    save_model(model, tmp_path / "merged")
    assert_close(logits(hf_model(tmp_path / "merged"), ids), unmerged, f"{family}: merged, in transformers")


def test_new_adapter_changes_nothing_and_disabling_restores_the_base(checkpoint):
    path = checkpoint("qwen2_moe")
    model = load_model(path, dtype=torch.float32)
    ids = ids_for(4)
    before = logits(model, ids)
    add_lora(model, LoraConfig(r=8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(model, ids), before)  # B = 0
    assert all(p.requires_grad for p in lora_parameters(model))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)
    randomize_adapters_(model)
    with adapters_disabled(model):
        assert torch.equal(logits(model, ids), before)
    assert not torch.equal(logits(model, ids), before)


def test_bf16_base_under_autocast(checkpoint):
    """The training setup for a large base: frozen bf16 weights, float32 adapters, bf16 autocast; gradients
    reach every adapter."""
    model = load_model(checkpoint("deepseek_v3_noaux_tc"), dtype=torch.bfloat16)
    add_lora(model, LoraConfig(r=4))
    randomize_adapters_(model, scale=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids_for(5))
    out.float().logsumexp(-1).mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0
               for p in lora_parameters(model))


# ---------------------------------------------------------------- errors

@pytest.mark.filterwarnings("ignore:.*left without an adapter")
def test_adapter_errors(checkpoint, tmp_path):
    path = checkpoint("deepseek_v3_noaux_tc")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(load_model(path), tmp_path)
    model = load_model(path, dtype=torch.float32)
    add_lora(model, LoraConfig(r=2))
    save_adapter(model, tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())

    def variant(name, **changes):
        import shutil
        d = tmp_path / name
        shutil.copytree(tmp_path / "ok", d)
        (d / "adapter_config.json").write_text(json.dumps(cfg | changes))
        return d

    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(load_model(path), variant("dora", use_dora=True))
    with pytest.raises(AdapterError, match="has shape"):  # the file's rank is 2
        load_adapter(load_model(path), variant("rank", r=3))
    with pytest.raises(AdapterError, match="match no target"):  # the expert tensors have no target left
        load_adapter(load_model(path), variant("fewer", target_parameters=[]))
    with pytest.raises(AdapterError, match="no module of this model"):
        load_adapter(load_model(path), variant("none", target_modules=["nothing"], target_parameters=[]))
    # an adapter for another architecture
    with pytest.raises(AdapterError, match="missing|has shape"):
        load_adapter(load_model(checkpoint("qwen2_moe")), tmp_path / "ok")
    with pytest.raises(ValueError, match="nn.Linear"):
        add_lora(load_model(path), LoraConfig(target_modules=["kv_a_layernorm"]))
    with pytest.raises(ValueError, match="already has an adapter"):
        add_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        add_lora(load_model(checkpoint("qwen2_tied")), LoraConfig(target_modules=["lm_head"]))


# ---------------------------------------------------------------- training and serving

@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    rows = [{"prompt": i.prompt, "completion": i.solution} for i in generate(TASKS["arithmetic"], 4, seed=0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lora_cfg(model_dir, data, out_dir, **kw) -> TrainConfig:
    base = dict(mode="lora", model=str(model_dir), data=str(data), out_dir=str(out_dir), lora_r=8, steps=12,
                batch_size=4, lr=1e-2, warmup_steps=1, min_lr_ratio=1.0, weight_decay=0.0, progress=False)
    return TrainConfig(**(base | kw))


def log_of(out_dir) -> list[dict]:
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


def test_train_lora_lowers_loss_and_keeps_the_base(checkpoint, sft_file, tmp_path):
    path = checkpoint("deepseek_v3_noaux_tc")
    model = train_lora(lora_cfg(path, sft_file, tmp_path))
    log = log_of(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < 0.85 * log[0]["loss"]
    base = load_model(path, dtype=torch.float32)
    trained = model.state_dict()
    for name, t in base.state_dict().items():  # every base weight, router bias included, bit for bit
        assert torch.equal(trained[name], t), name
    ckpt = tmp_path / "checkpoint-000012"
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["base_model_name_or_path"] == str(path)
    assert (ckpt / "trainer_state.pt").is_file()


def test_train_lora_resume_matches_an_uninterrupted_run(checkpoint, sft_file, tmp_path):
    path = checkpoint("qwen2_moe")
    kw = dict(steps=4, warmup_steps=2, min_lr_ratio=0.1, grad_accum=2, batch_size=2)
    straight = train_lora(lora_cfg(path, sft_file, tmp_path / "a", **kw))
    train_lora(lora_cfg(path, sft_file, tmp_path / "b", save_every=2, **kw | {"steps": 2}))
    resumed = train_lora(lora_cfg(path, sft_file, tmp_path / "b", resume_from=str(tmp_path / "b" / "checkpoint-000002"),
                                  **kw))
    for a, b in zip(lora_parameters(straight), lora_parameters(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["lr"] for r in log_of(tmp_path / "b")] == [r["lr"] for r in log_of(tmp_path / "a")]


def test_serve_with_adapter_equals_the_merged_model(checkpoint, tmp_path):
    """LLM(base, adapter=DIR) merges on load: the same weights and the same greedy tokens as a checkpoint of
    the merged model; the CLI's --adapter reaches it."""
    path = checkpoint("deepseek_v3_noaux_tc")
    model = load_model(path, dtype=torch.float32)
    add_lora(model, LoraConfig(r=4))
    randomize_adapters_(model, scale=0.5)
    save_adapter(model, tmp_path / "adapter")
    merge_lora(model)
    save_model(model, tmp_path / "merged")
    import shutil
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / f, tmp_path / "merged" / f)

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of France is", [5, 6, 7, 8]]
    with_adapter = LLM(path, device="cpu", dtype="float32", adapter=str(tmp_path / "adapter"), kv_cache_bytes=1 << 22)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(with_adapter.model.state_dict()[name], t, rtol=0, atol=0, msg=name)
    merged = LLM(tmp_path / "merged", device="cpu", dtype="float32", kv_cache_bytes=1 << 22)
    plain = LLM(path, device="cpu", dtype="float32", kv_cache_bytes=1 << 22)
    ours = [o.token_ids for o in with_adapter.generate(prompts, params)]
    assert ours == [o.token_ids for o in merged.generate(prompts, params)]
    assert ours != [o.token_ids for o in plain.generate(prompts, params)]

    from mixr.cli import main
    main(["generate", str(path), "hi", "--adapter", str(tmp_path / "adapter"), "--max-tokens", "2"])
    with pytest.raises(SystemExit):  # a bad adapter directory is one line and exit 2
        main(["generate", str(path), "hi", "--adapter", str(tmp_path / "missing"), "--max-tokens", "2"])


def test_cli_train_lora_from_yaml(checkpoint, sft_file, tmp_path):
    from mixr.cli import main
    out = tmp_path / "run"
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(f"model: {checkpoint('deepseek_v3_noaux_tc')}\ndata: {sft_file}\nout_dir: {out}\nlora_r: 2\n"
                   "lora_target_modules: [o_proj]\nlora_target_parameters: []\nsteps: 2\nbatch_size: 2\n"
                   "warmup_steps: 1\nprogress: false\n")
    main(["train", "lora", "--config", str(cfg)])
    saved = json.loads((out / "checkpoint-000002" / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["self_attn.o_proj"] and saved["target_parameters"] == []
    with pytest.raises(SystemExit):
        cfg.write_text(cfg.read_text().replace("lora_r: 2", "lora_r: 0"))
        main(["train", "lora", "--config", str(cfg)])
