"""Tensor- and expert-parallel sharding (mixr.parallel) on 2 CPU processes over gloo, against the unsharded model."""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAMILIES, VOCAB, make_hf_checkpoint

from mixr import load_model
from mixr.parallel import shard_model
from mixr.reference import reference_generate

WORLD = 2
STEPS = 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _spawned(rank: int, init: str, body, *args) -> None:
    """One rank: join the gloo group, run body(rank, *args), leave. On success the process ends with os._exit:
    about one run in twenty, a child of this CPU build of torch aborted at interpreter exit, after its work and
    destroy_process_group ("terminate called without an active exception", no Python frame left)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    body(rank, *args)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _compare(rank: int, path: str, vocab: int, absorbed: bool) -> None:
    """On each rank: the full model's logits and greedy tokens, then those of its TP and EP shards."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 13), generator=gen)
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 11)]
    full = load_model(path, dtype=torch.float32, progress=False)
    with torch.no_grad():
        expected = full(ids)
    expected_tokens = reference_generate(full, prompts, STEPS, absorbed_decode=absorbed)
    assert len(set(map(tuple, expected_tokens))) == 2  # the prompts lead to different continuations
    for mode in ("tp", "ep"):
        model = shard_model(load_model(path, dtype=torch.float32, progress=False), rank, WORLD, experts=mode)
        check_shard(model, full, mode)
        with torch.no_grad():
            got = model(ids)
        assert got.shape == expected.shape, (mode, got.shape)
        err = rel_err(got, expected)
        assert err < 1e-5, f"{mode} rank {rank}: relative logit error {err:.2e}"
        tokens = reference_generate(model, prompts, STEPS, absorbed_decode=absorbed)
        assert tokens == expected_tokens, f"{mode} rank {rank}: greedy tokens differ"


def _engine(rank: int, path: str) -> None:
    """The engine (paged cache, scheduler, MLA's absorbed decode) runs a sharded model unchanged."""
    from mixr import LLM, SamplingParams
    from mixr.tokenizer import Tokenizer

    prompts = [[5, 7, 9, 11], [100, 3, 44, 12, 99, 18, 7]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.token_ids for o in LLM(path, device="cpu", dtype="float32").generate(prompts, params)]
    tokenizer = Tokenizer.from_dir(path)
    for mode in ("tp", "ep"):
        model = shard_model(load_model(path, dtype=torch.float32, progress=False), rank, WORLD, experts=mode)
        got = LLM(model, tokenizer=tokenizer, device="cpu", dtype="float32").generate(prompts, params)
        assert [o.token_ids for o in got] == expected, f"{mode} rank {rank}"
    # another dtype: the engine deep-copies the model, which must keep its process group
    got = LLM(model, tokenizer=tokenizer, device="cpu", dtype="bfloat16").generate(prompts, params)
    assert [len(o.token_ids) for o in got] == [12, 12]


def _rank_ids(rank: int, vocab: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(100 + rank))


def _compare_dp(rank: int, path: str, vocab: int) -> None:
    """Data-parallel attention: each rank feeds tokens of its own, and gets the full model's hidden states for them,
    by all-to-all dispatch (unequal token counts) and by all-gather (equal counts); rank 0's LM head gives every
    rank's logits in rank order."""
    from mixr.parallel import DispatchedExperts

    full = load_model(path, dtype=torch.float32, progress=False)
    model = shard_model(load_model(path, dtype=torch.float32, progress=False), rank, WORLD, experts="ep",
                        attention="dp")
    moes = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert moes and all(isinstance(m, DispatchedExperts) for m in moes)
    E = full.model.layers[-1].mlp.experts.gate_up_proj.shape[0]
    assert moes[-1].gate_up_proj.shape[0] == E // WORLD and moes[-1].first == rank * E // WORLD
    assert model.model.embed_tokens.weight.shape == full.model.embed_tokens.weight.shape  # replicated
    for dispatch, shapes in (("all_to_all", [(2, 13), (1, 5)]), ("all_gather", [(2, 9), (2, 9)])):
        for m in moes:
            m.dispatch = dispatch
        ids = [_rank_ids(r, vocab, shape) for r, shape in enumerate(shapes)]
        with torch.no_grad():
            expected = [full.hidden_states(x) for x in ids]
            got = model.hidden_states(ids[rank])
            err = rel_err(got, expected[rank])
            assert err < 1e-5, f"{dispatch} rank {rank}: relative hidden-state error {err:.2e}"
            logits = model.lm_head(got[0, -1:])  # one row from each rank
        if rank == 0:
            want = full.lm_head(torch.stack([h[0, -1] for h in expected]))
            assert rel_err(logits, want) < 1e-5
        else:
            assert logits.shape == (WORLD, 0)


def check_shard(model, full, mode: str) -> None:
    """The rank really holds only its part: local head counts, vocab slice, experts or expert slices."""
    assert model.lm_head.weight.shape[0] == -(-full.config.vocab_size // WORLD)
    assert model.config.vocab_size == full.config.vocab_size
    assert model.config.num_attention_heads * WORLD == full.config.num_attention_heads
    for layer, ref in zip(model.model.layers, full.model.layers):
        assert layer.self_attn.num_heads * WORLD == ref.self_attn.num_heads
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            E, two_i, _ = ref.mlp.experts.gate_up_proj.shape
            assert experts.gate_up_proj.shape[:2] == ((E // WORLD, two_i) if mode == "ep" else (E, two_i // WORLD))


def run_sharded(path, tmp_path, vocab: int = VOCAB, absorbed: bool = False) -> None:
    spawn(tmp_path, _compare, str(path), vocab, absorbed)


def spawn(tmp_path, body, *args) -> None:
    mp.spawn(_spawned, args=(f"file://{tmp_path / 'rendezvous'}", body, *args), nprocs=WORLD)


@pytest.mark.parametrize("name,absorbed", [("deepseek_v2_greedy", False), ("deepseek_v3_noaux_tc", True),
                                           ("qwen2_moe", False), ("qwen3_moe", False)])
def test_tp_and_ep_match_unsharded(name, absorbed, checkpoint, tmp_path):
    """DeepSeek-V2 (MLA without q_lora), V3 (q_lora, sigmoid noaux_tc; decode through absorbed MLA), Qwen2-MoE
    (gated shared expert, GQA), Qwen3-MoE (per-head Q/K norm, a dense layer)."""
    run_sharded(checkpoint(name), tmp_path, absorbed=absorbed)


def test_mixtral_with_padded_vocab(tmp_path):
    """Mixtral, with a vocabulary that world_size does not divide: the embedding and lm_head pad their slices."""
    model_type, kwargs = FAMILIES["mixtral"]
    vocab = VOCAB - 1
    path = make_hf_checkpoint(tmp_path / "ckpt", model_type, {**kwargs, "vocab_size": vocab})
    run_sharded(path, tmp_path, vocab=vocab)


@pytest.mark.parametrize("name", ["deepseek_v2_greedy", "qwen2_moe", "mixtral"])
def test_data_parallel_attention_matches_unsharded(name, checkpoint, tmp_path):
    """V2 (a dense first layer, shared experts), Qwen2-MoE (gated shared expert), Mixtral (no shared expert)."""
    spawn(tmp_path, _compare_dp, str(checkpoint(name)), VOCAB)


def test_kv_heads_fewer_than_ranks_are_replicated(checkpoint):
    """Mixtral's 4 heads and 2 KV heads on 4 ranks: rank r keeps q head r and KV head r // 2, and shard_of (the
    sliced load) cuts the same rows."""
    from mixr.parallel import shard_of
    path = checkpoint("mixtral")
    full = load_model(path, dtype=torch.float32, progress=False)
    D = full.model.layers[0].self_attn.head_dim
    for rank in range(4):
        model = shard_model(load_model(path, dtype=torch.float32, progress=False), rank, 4)
        attn = model.model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads, model.config.num_key_value_heads) == (1, 1, 1)
        for name in ("k_proj", "v_proj"):
            ref = getattr(full.model.layers[0].self_attn, name).weight
            got = getattr(attn, name).weight
            head = rank // 2
            assert torch.equal(got, ref[head * D:(head + 1) * D])
            assert torch.equal(shard_of(f"model.layers.0.self_attn.{name}.weight", ref, got.shape, rank, 4), got)


def test_sizes_that_do_not_divide_raise(checkpoint):
    model = load_model(checkpoint("mixtral"), dtype=torch.float32, progress=False)  # 4 heads, 2 KV heads, 4 experts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by world_size=3"):
        shard_model(model, 0, 3)
    attn = model.model.layers[0].self_attn
    attn.num_kv_heads = 3  # (checked before any weight is read)
    with pytest.raises(ValueError, match="num_key_value_heads=3 does not divide world_size=4"):
        shard_model(model, 0, 4)
    with pytest.raises(ValueError, match="num_key_value_heads=3 is not divisible by world_size=2"):
        shard_model(model, 0, 2)
    attn.num_kv_heads = 2
    with pytest.raises(ValueError, match="experts must be 'tp' or 'ep'"):
        shard_model(model, 0, 2, experts="dp")
    with pytest.raises(ValueError, match="data-parallel attention splits the routed experts by expert"):
        shard_model(model, 0, 2, attention="dp")
    with pytest.raises(ValueError, match="attention must be 'tp' or 'dp'"):
        shard_model(model, 0, 2, attention="sp")
    # a failed call leaves the model whole
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # expert counts and expert widths that 2 does not divide (the checks read the stacked weights' shapes)
    moe = load_model(checkpoint("qwen2_moe"), dtype=torch.float32, progress=False)
    experts = moe.model.layers[0].mlp.experts
    experts.gate_up_proj.data = experts.gate_up_proj.data[:5, :26]  # 5 experts, moe_intermediate_size 13
    with pytest.raises(ValueError, match="layer 0: number of routed experts=5 is not divisible by world_size=2"):
        shard_model(moe, 0, 2, experts="ep")
    with pytest.raises(ValueError, match="layer 0: moe_intermediate_size=13 is not divisible by world_size=2"):
        shard_model(moe, 0, 2, experts="tp")


def test_engine_runs_sharded_model(checkpoint, tmp_path):
    spawn(tmp_path, _engine, str(checkpoint("deepseek_v3_noaux_tc")))
