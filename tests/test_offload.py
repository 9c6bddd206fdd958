"""CPU+GPU hybrid experts (mixr.offload). On a CPU the "device" cache is CPU memory, which exercises the cache
logic, the CPU-compute and the copy-in paths: outputs must equal the plain model's for every budget."""

import pytest
import torch

from conftest import VOCAB
from mixr import LLM, SamplingParams
from mixr.checkpoint import load_model
from mixr.engine.llm_engine import EngineConfig
from mixr.kernels import fused_moe, fused_moe_ref
from mixr.offload import OffloadedExperts, _Staging, offload_experts, offload_stats

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
