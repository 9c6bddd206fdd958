"""Every family against transformers on tiny random checkpoints: logits and greedy tokens."""

import pytest
import torch

from conftest import FAMILIES, VOCAB
from mixr import LLM, SamplingParams, load_model

torch.set_num_threads(2)


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(name, checkpoint):
    path = checkpoint(name)
    ref, ours = hf_model(path), load_model(path, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids)
    err = rel_err(got, expected)
    print(f"{name}: max relative logit error {err:.2e}")
    assert expected.abs().max() > 1.0, "weights too small for a meaningful comparison"
    assert err < 1e-4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_generation_matches_transformers(name, checkpoint):
    path = checkpoint(name)
    ref = hf_model(path)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 19, 11)]
    expected = []
    for p in prompts:  # one at a time: no padding in the reference
        out = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        expected.append(out[0, len(p):].tolist())
    llm = LLM(path, device="cpu", dtype="float32")
    got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert [o.token_ids for o in got] == expected
    assert all(o.finish_reason == "length" for o in got)
    assert len(set(map(tuple, expected))) == 3  # the prompts led to different continuations


def test_multi_shard_checkpoint_with_index(checkpoint):
    path = checkpoint("deepseek_v3_noaux_tc", shard="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 3
    ref, ours = hf_model(path), load_model(path, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).logits) < 1e-4


def test_bf16_load_converts_on_the_fly(checkpoint):
    path = checkpoint("qwen3_moe")
    model = load_model(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load_model(path, dtype=torch.float32)(ids)
        got = model(ids).float()
    # mean, not max: in bf16 a token whose top experts nearly tie may route differently, as in any bf16 MoE
    assert ((got - ref).abs().mean() / ref.abs().mean()).item() < 5e-2


def test_forward_supports_autograd(checkpoint):
    """Training reuses the same module: gradients must reach attention, router and experts."""
    model = load_model(checkpoint("deepseek_v3_noaux_tc"), dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    moe = model.model.layers[1].mlp
    for p in (moe.gate.weight, moe.experts.gate_up_proj, moe.experts.down_proj, moe.shared_experts.up_proj.weight,
              model.model.layers[0].self_attn.kv_b_proj.weight, model.model.embed_tokens.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_routing_stays_float32_under_autocast(checkpoint):
    """Training runs under bf16 autocast; the router must still score and pick experts in float32."""
    model = load_model(checkpoint("deepseek_v3_noaux_tc"), dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    router = model.model.layers[1].mlp.gate
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, _, logits = router(x)
        out = model(ids)  # used to fail: bf16 routing weights reached the experts
    assert weights.dtype == logits.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["deepseek_v3_noaux_tc", "deepseek_v2_greedy"])  # q_a_proj / q_proj with kv_a
def test_mla_fused_input_projections(name, checkpoint):
    """The engine's one-GEMM projection of x (MLAttention.fuse_input_projections): same logits, same parameters
    and names, in-place weight updates reach it, and autograd or a moved model takes the separate linears."""
    from mixr.layers.mla import MLAttention
    model = load_model(checkpoint(name), dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(ids)
    params, keys = dict(model.named_parameters()), set(model.state_dict())
    attns = [m for m in model.modules() if isinstance(m, MLAttention)]
    assert all(a.fuse_input_projections() for a in attns)
    assert dict(model.named_parameters()) == params and set(model.state_dict()) == keys  # same objects
    calls = []
    handle = torch.nn.functional.linear
    torch.nn.functional.linear = lambda x, w, b=None: calls.append(w.shape) or handle(x, w, b)
    try:
        with torch.no_grad():
            got = model(ids)
    finally:
        torch.nn.functional.linear = handle
    assert rel_err(got, ref) < 1e-6
    fused_rows = attns[0]._fused_in["weight"].shape[0]
    assert calls.count(torch.Size((fused_rows, 64))) == len(attns)  # one fused GEMM per layer ran
    q = attns[0]._input_linears()[0]
    with torch.no_grad():
        q.weight.copy_(q.weight.roll(1, 0))  # an in-place update (LLM.update_weights) reaches the fused weight
        assert torch.equal(attns[0]._fused_in["weight"][:q.out_features], q.weight)
        changed = model(ids)
    assert rel_err(changed, ref) > 1e-3
    model(ids).sum().backward()  # grad mode: the separate linears, so gradients reach the parameters
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0
    model.double()  # new storage: the stale fused weight must not be used
    with torch.no_grad():
        assert rel_err(model(ids).float(), changed) < 1e-5
