"""CPU+GPU hybrid experts (mixr.offload). On a CPU the "device" cache is CPU memory, which exercises the cache
logic, the CPU-compute and the copy-in paths: outputs must equal the plain model's for every budget."""

from itertools import pairwise

import pytest
import torch

from conftest import VOCAB
from mixr import LLM, SamplingParams
from mixr.checkpoint import load_model
from mixr.engine.llm_engine import EngineConfig
from mixr.kernels import fused_moe, fused_moe_ref
from mixr.offload import OffloadedExperts, _Bulk, _Staging, offload_experts, offload_stats

NAME = "deepseek_v3_noaux_tc"  # 16 experts, top-3, two MoE layers
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def prompts(seed=0, lengths=(5, 23, 11, 40)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def expert_bytes(path) -> int:
    m = load_model(path, dtype="float32", progress=False)
    e = next(x for x in m.modules() if hasattr(x, "gate_up_proj"))
    return e.gate_up_proj[0].nbytes + e.down_proj[0].nbytes


@pytest.mark.parametrize("slots", [0, 1, 5, 16])
@pytest.mark.parametrize("cpu_max_tokens", [0, 4, 10_000])  # all misses copied in / mixed / all on the CPU
def test_offloaded_model_matches_the_plain_model(checkpoint, slots, cpu_max_tokens):
    path = checkpoint(NAME)
    plain = load_model(path, dtype="float32", progress=False)
    hybrid = load_model(path, dtype="float32", progress=False)
    budget = slots * 2 * expert_bytes(path) / 1e9  # two MoE layers
    summary = offload_experts(hybrid, "cpu", budget, cpu_max_tokens=cpu_max_tokens, staging_group=3, balance=False)
    assert summary["slots_per_layer"] == slots and summary["moe_layers"] == 2
    g = torch.Generator().manual_seed(1)
    for L in (1, 3, 37):  # decode-sized and prefill-sized calls; the cache changes between them
        ids = torch.randint(3, VOCAB, (2, L), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(hybrid(ids), plain(ids), rtol=1e-5, atol=1e-5)
    stats = offload_stats(hybrid)
    if slots == 16:
        assert stats["pairs"] == 0  # everything resident: no host round trip, nothing counted
        return
    assert stats["pairs"] == 2 * 2 * (1 + 3 + 37) * 3  # layers x batch x tokens x top-3
    assert stats["gpu_pairs"] + stats["cpu_pairs"] + stats["copied_pairs"] == stats["pairs"]
    if slots == 0:
        assert stats["gpu_pairs"] == 0
    if cpu_max_tokens == 0:
        assert stats["cpu_pairs"] == 0 and stats["copied_experts"] > 0
    if cpu_max_tokens == 10_000:
        assert stats["copied_pairs"] == 0 and stats["admitted"] == 0


@pytest.mark.parametrize("slots", [0, 1, 5])
def test_bulk_path_matches_the_plain_model(checkpoint, slots):
    """Calls of >= 4 tokens take the bulk path (every non-resident expert copied in, the next layer's copy started
    by the one before); 1-token-per-sequence calls between them take the per-expert path and change the cache."""
    path = checkpoint(NAME)
    plain = load_model(path, dtype="float32", progress=False)
    hybrid = load_model(path, dtype="float32", progress=False)
    budget = slots * 2 * expert_bytes(path) / 1e9
    summary = offload_experts(hybrid, "cpu", budget, cpu_max_tokens=4, staging_group=3, balance=False,
                              bulk_min_tokens=4)
    assert summary["bulk_min_tokens"] == 4 and summary["bulk_bytes"] == 2 * (16 - slots) * expert_bytes(path)
    g = torch.Generator().manual_seed(2)
    lengths = (37, 1, 3, 1, 1, 20)
    for L in lengths:
        ids = torch.randint(3, VOCAB, (2, L), generator=g)
        with torch.no_grad():
            torch.testing.assert_close(hybrid(ids), plain(ids), rtol=1e-5, atol=1e-5)
    stats = offload_stats(hybrid)
    bulk = sum(2 * L >= 4 for L in lengths)
    assert stats["pairs"] == 2 * 2 * sum(lengths) * 3
    assert stats["gpu_pairs"] + stats["cpu_pairs"] + stats["copied_pairs"] == stats["pairs"]
    assert stats["bulk_calls"] == 2 * bulk and stats["prefetched"] == bulk  # the second MoE layer's, each time
    assert stats["copied_experts"] >= 2 * bulk * (16 - slots)
    if slots:
        assert stats["admitted"] > 0  # the bulk path still fills the cache with the most used experts


def chain(n, slots, min_tokens, E=8, H=32, I=16, device="cpu", dtype=torch.float32):
    """n offloaded layers sharing staging and bulk buffers, each one's copy started by the one before."""
    cases = [layer_case(E, H, I, seed=i, dtype=dtype) for i in range(n)]
    staging = _Staging(2, 2 * I, H, I, dtype, torch.device(device))
    bulk = _Bulk(E - slots, 2 * I, H, I, dtype, torch.device(device), staging.stream, min_tokens)
    pin = torch.device(device).type == "cuda"
    layers = [OffloadedExperts(gu.pin_memory() if pin else gu, dn.pin_memory() if pin else dn, slots,
                               torch.device(device), staging, cpu_max_tokens=0, half_life_tokens=64, balance=False,
                               bulk=bulk) for gu, dn in cases]
    bulk.next_of = dict(pairwise(layers))
    return cases, layers


def test_bulk_prefetch_is_used_only_while_the_cache_is_unchanged():
    (a_w, b_w), (a, b) = chain(2, slots=3, min_tokens=10)
    g = torch.Generator().manual_seed(3)

    def call(layer, weights, T, hot=()):
        x = torch.randn(T, 32, generator=g)
        ids, w = routing(T, 8, 3, list(hot), g, "cpu")
        torch.testing.assert_close(layer(x, ids, w), fused_moe_ref(x, *weights, ids, w))

    call(a, a_w, 40)  # bulk: copies a's 5 non-resident experts, then starts b's
    assert a.stats.bulk_calls == 1 and a.stats.prefetched == 0 and a.bulk.held[1][0] is b
    version = b.version
    call(b, b_w, 3, hot=[5, 6])  # per-expert path: 5 and 6 copied in take slots, so b's prefetch is stale
    assert b.stats.bulk_calls == 0 and b.stats.admitted > 0 and b.version > version
    call(b, b_w, 40)  # and b copies again, for its new non-resident set
    assert b.stats.bulk_calls == 1 and b.stats.prefetched == 0
    call(a, a_w, 40)
    call(b, b_w, 40)  # this time the prefetch matches
    assert b.stats.bulk_calls == 2 and b.stats.prefetched == 1 and a.bulk.held == [None, None]
    assert sum(s >= 0 for s in b.slot_of) == 3 and b.slot_table.tolist() == b.slot_of + [-1]


def test_engine_with_offload_generates_what_the_plain_engine_does(checkpoint):
    path = checkpoint(NAME)
    ps = prompts()
    plain = LLM(path, device="cpu", dtype="float32", block_size=8)
    expected = [o.token_ids for o in plain.generate(ps, GREEDY)]
    for budget_slots in (0, 3):
        llm = LLM(path, device="cpu", dtype="float32", block_size=8, expert_offload="cpu",
                  gpu_expert_budget_gb=budget_slots * 2 * expert_bytes(path) / 1e9)
        assert [o.token_ids for o in llm.generate(ps, GREEDY)] == expected
        stats = offload_stats(llm.model)
        assert stats["resident_experts"] == 2 * budget_slots and stats["pairs"] > 0
        assert llm.engine.runner.graphs == {}
    # the bulk path inside the engine: the prefill step (79 tokens) takes it, the decode steps (<= 4) do not
    llm = LLM(path, device="cpu", dtype="float32", block_size=8, expert_offload="cpu",
              gpu_expert_budget_gb=3 * 2 * expert_bytes(path) / 1e9)
    next(m for m in llm.model.modules() if isinstance(m, OffloadedExperts)).bulk.min_tokens = 8  # shared
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == expected
    stats = offload_stats(llm.model)
    assert stats["bulk_calls"] == 2 and stats["prefetched"] == 1 and stats["calls"] > 2
    # dynamic routing passes its dropped (-1) pairs through the offloaded layers
    dyn = dict(moe_dynamic="top_p", moe_top_p=0.6)
    want = [o.token_ids for o in LLM(path, device="cpu", dtype="float32", block_size=8, **dyn).generate(ps, GREEDY)]
    got = LLM(path, device="cpu", dtype="float32", block_size=8, expert_offload="cpu", gpu_expert_budget_gb=1e-4,
              **dyn).generate(ps, GREEDY)
    assert [o.token_ids for o in got] == want


def layer_case(E=8, H=32, I=16, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype)
    down = (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype)
    return gate_up, down


def make_layer(gate_up, down, slots, device, cpu_max_tokens=4, group=2, balance=False):
    E, two_i, H = gate_up.shape
    staging = _Staging(group, two_i, H, two_i // 2, gate_up.dtype, torch.device(device))
    if torch.device(device).type == "cuda":
        gate_up, down = gate_up.pin_memory(), down.pin_memory()
    return OffloadedExperts(gate_up, down, slots, torch.device(device), staging, cpu_max_tokens,
                            half_life_tokens=64, balance=balance)


def routing(T, E, k, hot: list[int], g, device):
    """Random distinct experts per token, with the `hot` ones in every token's set (and some pairs dropped)."""
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    for j, e in enumerate(hot):
        row_has = (ids == e).any(1)
        ids[~row_has, j] = e
    ids[torch.rand(T, k, generator=g) < 0.1] = -1
    w = torch.rand(T, k, generator=g)
    return ids.to(device), w.to(device)


def test_frequent_experts_become_resident_and_outputs_stay_right():
    gate_up, down = layer_case()
    layer = make_layer(gate_up, down, slots=2, device="cpu", cpu_max_tokens=4)
    g = torch.Generator().manual_seed(5)
    hot = [6, 7]  # start non-resident (experts 0 and 1 start in the two slots)
    for step in range(12):  # decode-sized calls: misses on the CPU, then promotion of the hot ones
        x = torch.randn(2, 32, generator=g)
        ids, w = routing(2, 8, 3, hot, g, "cpu")
        torch.testing.assert_close(layer(x, ids, w), fused_moe_ref(x, gate_up, down, ids, w))
    assert sorted(layer.expert_in) == hot and layer.stats.promoted >= 2
    assert [layer.slot_of[e] >= 0 for e in range(8)] == [e in hot for e in range(8)]
    assert layer.slot_table.tolist() == layer.slot_of + [-1]
    # a prefill-sized call that uses other experts more copies them in and admits the most used
    x = torch.randn(40, 32, generator=g)
    ids, w = routing(40, 8, 3, [2, 3], g, "cpu")
    torch.testing.assert_close(layer(x, ids, w), fused_moe_ref(x, gate_up, down, ids, w))
    counts = torch.bincount(ids[ids >= 0], minlength=8)
    resident = set(layer.expert_in)
    assert resident == {2, 3} and layer.stats.admitted == 2
    assert min(counts[e] for e in resident) >= max(counts[e] for e in range(8) if e not in resident)


def test_balanced_split_between_cpu_and_copies():
    gate_up, down = layer_case()
    layer = make_layer(gate_up, down, slots=0, device="cpu", cpu_max_tokens=64, balance=True)
    st = layer.staging
    st.cpu_fixed, st.cpu_per_token, st.copy_cost = 1.4, 0.1, 1.0  # seconds per expert, as if measured
    st.contention = 1.0
    counts = [1] * 5 + [0, 50, 70]
    # decode-like misses (1.5 s each on the CPU, 1 s to copy): 2 on the CPU (3 s) beside 3 copies (3 s), against
    # 5 s for copies only or 4 s with one on the CPU
    cpu, copied = layer._split([0, 1, 2, 3, 4], counts)
    assert len(cpu) == 2 and len(copied) == 3 and set(cpu + copied) == {0, 1, 2, 3, 4}
    # if running both at once slowed each 1.7x, copying all is best (5 s against 1.7 x 3 s)
    st.contention = 1.7
    assert layer._split([0, 1, 2, 3, 4], counts) == ([], [0, 1, 2, 3, 4])
    st.contention = 1.2
    assert len(layer._split([0, 1, 2, 3, 4], counts)[0]) == 2
    # prefill-like misses (6.4 s on the CPU) are all copied; the 1-token one still goes to the CPU
    st.contention = 1.0
    assert layer._split([6, 7], counts) == ([], [6, 7])
    assert layer._split([0, 6, 7], counts) == ([0], [6, 7])
    layer.cpu_max_tokens = 0
    assert layer._split([0, 1, 2], counts) == ([], [0, 1, 2])
    # calibration measures positive costs
    costs = st.calibrate(gate_up, down)
    assert costs["cpu_expert_ms"] > 0 and costs["copy_expert_ms"] > 0


def test_bad_offload_settings(checkpoint):
    with pytest.raises(ValueError, match="expert_offload"):
        EngineConfig(expert_offload="disk")
    with pytest.raises(ValueError, match="gpu_expert_budget_gb"):
        EngineConfig(expert_offload="cpu", gpu_expert_budget_gb=-1)
    with pytest.raises(ValueError, match="no routed experts"):
        offload_experts(load_model(checkpoint("qwen3"), progress=False), "cpu", 1.0)
    with pytest.raises(ValueError, match="gpu_expert_budget_gb"):
        offload_experts(load_model(checkpoint(NAME), progress=False), "cpu", -1.0)
    with pytest.raises(ValueError, match="bulk_min_tokens"):
        offload_experts(load_model(checkpoint(NAME), progress=False), "cpu", 0.0, bulk_min_tokens=0)
    summary = offload_experts(load_model(checkpoint(NAME), progress=False), "cpu", 0.0, bulk_min_tokens=None)
    assert summary["bulk_bytes"] == 0 and summary["bulk_min_tokens"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cpu_max_tokens,balance", [(0, False), (10_000, False), (64, True)])
def test_offloaded_layer_on_cuda_matches_all_on_gpu(cpu_max_tokens, balance):
    gate_up, down = layer_case(E=16, H=256, I=128, dtype=torch.bfloat16)
    layer = make_layer(gate_up, down, slots=4, device="cuda", cpu_max_tokens=cpu_max_tokens, group=3,
                       balance=balance)
    layer.staging.calibrate(layer.cpu_gate_up, layer.cpu_down)
    gu_d, dn_d = gate_up.cuda(), down.cuda()
    g = torch.Generator().manual_seed(7)
    for T in (1, 1, 2, 64, 1, 300, 1, 1):
        x = torch.randn(T, 256, generator=g).to("cuda", torch.bfloat16)
        ids, w = routing(T, 16, 4, [9, 12], g, "cuda")
        out = layer(x, ids, w)
        ref = fused_moe(x, gu_d, dn_d, ids, w)
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
    torch.cuda.synchronize()
    assert 9 in layer.expert_in and 12 in layer.expert_in


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bulk_path_on_cuda_matches_all_on_gpu():
    """Three layers run as in a forward, prefill-sized (bulk, side-stream copies prefetched a layer ahead) and
    decode-sized (per-expert) in turn."""
    cases, layers = chain(3, slots=4, min_tokens=64, E=16, H=256, I=128, device="cuda", dtype=torch.bfloat16)
    on_gpu = [(gu.cuda(), dn.cuda()) for gu, dn in cases]
    g = torch.Generator().manual_seed(9)
    sizes = (300, 1, 2, 500, 1, 64)
    for T in sizes:
        for layer, (gu, dn) in zip(layers, on_gpu):
            x = torch.randn(T, 256, generator=g).to("cuda", torch.bfloat16)
            ids, w = routing(T, 16, 4, [3, 11], g, "cuda")
            out, ref = layer(x, ids, w).float(), fused_moe(x, gu, dn, ids, w).float()
            assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    torch.cuda.synchronize()
    bulk = sum(T >= 64 for T in sizes)
    assert [m.stats.bulk_calls for m in layers] == [bulk] * 3
    assert [m.stats.prefetched for m in layers] == [0, bulk, bulk]
