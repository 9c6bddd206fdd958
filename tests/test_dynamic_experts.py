"""Dynamic expert count per token: the router rules against hand-computed and float64 references, the kernels'
skipping of dropped (-1) pairs, and the engine with the option off / at its exact setting."""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB
from mixr import LLM, SamplingParams
from mixr.engine.llm_engine import EngineConfig
from mixr.kernels import fused_moe, fused_moe_ref
from mixr.layers.moe import MoE, Router, RouterOptions, dynamic_expert_stats, set_dynamic_experts
from mixr.reference import reference_generate

moe_mod = importlib.import_module("mixr.kernels.fused_moe")
CUDA = torch.cuda.is_available() and moe_mod.HAS_TRITON
# Under TRITON_INTERPRET=1 (with triton importable) the Triton kernels run on CPU tensors too.
INTERPRET = moe_mod.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"

ROUTERS = {
    "softmax_greedy": dict(num_experts=8, top_k=3),
    "softmax_group_limited": dict(num_experts=16, top_k=4, topk_method="group_limited_greedy", n_group=4,
                                  topk_group=2, routed_scaling_factor=16.0),
    "sigmoid_noaux_tc_norm": dict(num_experts=16, top_k=4, scoring_func="sigmoid", topk_method="noaux_tc",
                                  n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                                  correction_bias=True),
}


def make_router(opts: dict, hidden: int = 32, seed: int = 0, **dynamic) -> Router:
    g = torch.Generator().manual_seed(seed)
    r = Router(hidden, RouterOptions(**opts, **dynamic))
    with torch.no_grad():
        r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.5)
        if opts.get("correction_bias"):
            r.e_score_correction_bias.copy_(0.3 * torch.randn(opts["num_experts"], generator=g))
    return r


def kept_by_hand(weights: list[float], rule: str, value: float, k_min: int = 1) -> int:
    """How many of one token's candidates a rule keeps, from the definition, in float64 Python."""
    w = sorted(weights, reverse=True)
    share = [x / sum(w) for x in w]
    if rule == "top_p":
        n, mass = 0, 0.0
        while n < len(w) and mass < value:
            mass += share[n]
            n += 1
    else:
        n = math.ceil(value * math.exp(-sum(s * math.log(s) for s in share if s > 0)))
    return min(max(n, k_min), len(w))


# ------------------------------------------------------------------------------------------------ the router
@pytest.mark.parametrize("name", list(ROUTERS))
def test_top_p_one_with_k_max_k_is_exact_top_k(name):
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    exact = make_router(ROUTERS[name])(x)
    k = ROUTERS[name]["top_k"]
    for dyn in (dict(dynamic="top_p", top_p=1.0, k_max=k), dict(dynamic="top_p", top_p=1.0),
                dict(dynamic="entropy", entropy_scale=float(k))):  # exp(H) >= 1, so scale k keeps all k
        got = make_router(ROUTERS[name], **dyn)(x)
        for a, b in zip(exact, got):
            assert torch.equal(a, b), dyn


def test_top_p_one_moe_layer_output_is_bitwise_exact():
    g = torch.Generator().manual_seed(2)
    opts = RouterOptions(**ROUTERS["sigmoid_noaux_tc_norm"])
    moe = MoE(32, 24, opts, shared_intermediate_size=24)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(2, 9, 32, generator=g)
    exact = moe(x)
    assert set_dynamic_experts(moe, "top_p", top_p=1.0, k_max=4) == 1
    assert torch.equal(moe(x), exact)
    set_dynamic_experts(moe, "top_p", top_p=0.5)
    assert not torch.allclose(moe(x), exact)
    set_dynamic_experts(moe, None)
    assert torch.equal(moe(x), exact) and moe.gate.experts_hist is None


def test_experts_per_token_on_a_router_with_known_probabilities():
    # Router weight = identity and x = log p: the softmax scores are exactly the probabilities p.
    probs = torch.tensor([[0.70, 0.20, 0.05, 0.05],    # top-3 shares .737 .211 .053
                          [0.25, 0.25, 0.25, 0.25],    # shares 1/3 each
                          [0.40, 0.40, 0.10, 0.10],    # shares .444 .444 .111
                          [0.97, 0.01, 0.01, 0.01]])   # shares .980 .010 .010
    r = Router(4, RouterOptions(num_experts=4, top_k=3, dynamic="top_p", top_p=0.9))
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    x = probs.log()
    weights, ids, _ = r(x)
    # mass before each candidate: (0, .737, .947) -> 2 run; (0, .333, .667) -> 3; (0, .444, .889) -> 3;
    # (0, .980, .990) -> 1
    assert (ids >= 0).sum(-1).tolist() == [2, 3, 3, 1]
    assert torch.equal(weights == 0, ids < 0)
    assert torch.allclose(weights.sum(-1), torch.tensor([0.90, 0.75, 0.90, 0.97]))  # no renormalisation
    stats = dynamic_expert_stats(r)
    assert stats["histogram"] == [0, 1, 1, 2] and stats["tokens"] == 4
    assert stats["avg_experts_per_token"] == pytest.approx(9 / 4)
    # the counters accumulate until reset
    r(x)
    assert dynamic_expert_stats(r, reset=True)["histogram"] == [0, 2, 2, 4]
    assert dynamic_expert_stats(r)["tokens"] == 0

    # entropy rule: exp(H) of the shares is 2.05, 3, 2.83, 1.12; scale 1 -> ceil -> 3, 3, 3, 2
    set_dynamic_experts(r, "entropy", entropy_scale=1.0)
    _, ids, _ = r(x)
    assert (ids >= 0).sum(-1).tolist() == [3, 3, 3, 2]
    set_dynamic_experts(r, "entropy", entropy_scale=0.5, k_min=2)  # 2, 2 (1.5), 2 (1.42), 1 -> k_min 2
    _, ids, _ = r(x)
    assert (ids >= 0).sum(-1).tolist() == [2, 2, 2, 2]
    assert dynamic_expert_stats(r)["avg_experts_per_token"] == 2.0


@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("rule,value", [("top_p", 0.3), ("top_p", 0.6), ("top_p", 0.85), ("entropy", 0.5),
                                        ("entropy", 0.7)])
def test_rules_keep_the_highest_weighted_candidates(name, rule, value):
    opts = ROUTERS[name]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    exact_w, exact_ids, _ = make_router(opts)(x)
    k_max = opts["top_k"]
    dyn = make_router(opts, dynamic=rule, **({"top_p": value} if rule == "top_p" else {"entropy_scale": value}))
    w, ids, _ = dyn(x)
    # raw (pre-normalisation) candidate weights, to apply the rule by hand
    raw = exact_w / opts.get("routed_scaling_factor", 1.0)
    hist = [0] * (k_max + 1)
    for t in range(x.shape[0]):
        n = kept_by_hand(raw[t].double().tolist(), rule, value)
        hist[n] += 1
        kept = ids[t] >= 0
        assert int(kept.sum()) == n
        assert torch.equal(ids[t][kept], exact_ids[t][kept])  # same columns, the rest -1
        assert raw[t][kept].min() >= raw[t][~kept].max() if n < k_max else True
        if opts.get("norm_topk_prob"):  # renormalised over the experts that run
            assert w[t].sum().item() == pytest.approx(opts["routed_scaling_factor"], rel=1e-5)
        else:
            assert torch.allclose(w[t][kept], exact_w[t][kept])
    assert dynamic_expert_stats(dyn)["histogram"] == hist
    assert sum(hist[1:k_max]) > 0  # the case drops something


def test_k_max_above_top_k_and_bad_options():
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    r = make_router(ROUTERS["softmax_greedy"], dynamic="top_p", top_p=0.99, k_max=6)
    w, ids, _ = r(x)
    assert ids.shape == (20, 6) and (ids >= 0).sum(-1).max() > 3
    for bad in (dict(dynamic="top_k"), dict(dynamic="top_p", top_p=0.0), dict(dynamic="top_p", top_p=1.5),
                dict(dynamic="entropy", entropy_scale=0.0), dict(dynamic="top_p", k_min=0),
                dict(dynamic="top_p", k_max=9), dict(dynamic="top_p", k_min=4, k_max=2)):
        with pytest.raises(ValueError):
            RouterOptions(num_experts=8, top_k=3, **bad)
    for bad in (dict(moe_dynamic="topp"), dict(moe_top_p=2.0), dict(moe_k_min=0), dict(moe_entropy_scale=-1)):
        with pytest.raises(ValueError):
            EngineConfig(**bad)


def test_gradients_flow_through_a_dynamic_layer():
    moe = MoE(16, 8, RouterOptions(num_experts=8, top_k=3, dynamic="top_p", top_p=0.6))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    moe(torch.randn(10, 16)).square().sum().backward()
    assert moe.experts.gate_up_proj.grad.abs().sum() > 0 and moe.gate.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ kernels
def moe_case(T, E, k, H, I, drop=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    w = torch.rand(T, k, generator=g) + 0.1
    dropped = torch.rand(T, k, generator=g) < drop
    dropped[0] = T > 1  # a token with nothing to run (when there are others)
    # Dropped pairs get id -1 and a NaN weight: the kernels must neither read the weight nor any expert for them.
    return x, gate_up, down, ids.masked_fill(dropped, -1), w.masked_fill(dropped, float("nan")), dropped


def kept_pairs_float64(x, gate_up, down, ids, w):
    I = down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                h = gate_up[e].double() @ x[t].double()
                out[t] += float(w[t, j]) * (down[e].double() @ (F.silu(h[:I]) * h[I:]))
    return out


def rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("T,E,k,H,I", [(1, 8, 3, 32, 24), (9, 8, 3, 48, 40), (40, 16, 6, 64, 24)])
def test_reference_skips_dropped_pairs(T, E, k, H, I):
    x, gu, dn, ids, w, dropped = moe_case(T, E, k, H, I)
    ref = kept_pairs_float64(x, gu, dn, ids, w)
    out = fused_moe_ref(x, gu, dn, ids, w)
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(out[0], torch.zeros(H)) or T == 1
    for bad, message in ((-2, "-1 for a skipped pair"), (E, f"only {E} experts")):
        wrong = ids.clone()
        wrong[-1, 0] = bad
        with pytest.raises(ValueError, match=message):
            fused_moe_ref(x, gu, dn, wrong, w)


def _kernel_configs():
    g = moe_mod._gemv
    m = moe_mod._gemm
    return {"gemv_fused_k": g(16, 32, 16, 32, fuse_k=True), "gemv_per_pair": g(16, 32, 16, 32, fuse_k=False),
            "gemv_tail": g(8, 32, 8, 16, fuse_k=True), "gemm": m(16, (32, 32, 1, 4, 1), (32, 32, 1, 4, 1)),
            "gemm_tail": m(32, (16, 32, 2, 4, 1), (16, 32, 2, 4, 1))}


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA and Triton, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("path", list(_kernel_configs()) if moe_mod.HAS_TRITON else ["none"])
@pytest.mark.parametrize("T,E,k,H,I", [(1, 8, 3, 48, 40), (9, 8, 3, 48, 40), (40, 16, 6, 64, 40)])
def test_triton_kernels_skip_dropped_pairs(path, T, E, k, H, I):
    x, gu, dn, ids, w, dropped = moe_case(T, E, k, H, I)
    ref = kept_pairs_float64(x, gu, dn, ids, w)
    cfg = _kernel_configs()[path]
    if CUDA:
        args = [t.cuda() for t in (x.bfloat16(), gu.bfloat16(), dn.bfloat16(), ids, w)]
        out = fused_moe(*args, config=cfg).float().cpu()
        tol = 2e-2
    else:  # the interpreter runs the kernels on CPU tensors, in float32
        ids = ids.contiguous()
        if cfg["path"] == "gemv":
            out = moe_mod._fused_moe_gemv(x, gu, dn, ids, w, T, H, I, k, cfg)
        else:
            out = moe_mod._fused_moe_gemm(x, gu, dn, ids, w, T, H, E, I, k, cfg)
        tol = 1e-5
    assert rel_err(out, ref) < tol
    assert torch.equal(out[0], torch.zeros(H, dtype=out.dtype)) or T == 1


drop_mod = importlib.import_module("mixr.kernels.expert_drop")


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA and Triton, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("rule,value,k_min", [("top_p", 0.5, 1), ("top_p", 0.8, 2), ("top_p", 1.0, 1),
                                              ("entropy", 0.6, 1), ("entropy", 1.0, 2)])
@pytest.mark.parametrize("K", [4, 6, 8])
def test_expert_drop_kernel_matches_reference(rule, value, k_min, K):
    g = torch.Generator().manual_seed(K)
    w = torch.rand(37, K, generator=g) ** 3  # skewed, so the rules keep different counts
    w[0] = 0.25  # equal weights: ties go to the lower column in both
    ids = torch.rand(37, 16, generator=g).argsort(-1)[:, :K]
    want_hist = torch.zeros(K + 1, dtype=torch.int64)
    want = drop_mod.expert_drop_ref(w, ids, rule, value, k_min, want_hist)
    hist = torch.zeros(K + 1, dtype=torch.int64)
    if CUDA:
        hist = hist.cuda()
        got = drop_mod.expert_drop(w.cuda(), ids.cuda(), rule, value, k_min, hist)
    else:
        got = drop_mod._launch(w, ids, rule, value, k_min, hist)
    assert torch.equal(got[1].cpu(), want[1]) and torch.allclose(got[0].cpu(), want[0])
    assert torch.equal(hist.cpu(), want_hist)
    exact = rule == "top_p" and value == 1
    assert (want_hist[K] == 37) == exact  # everything kept at p = 1, something dropped otherwise


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
@pytest.mark.parametrize("name", list(ROUTERS))
def test_cuda_dynamic_router_matches_the_cpu_path(name):
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(9))
    r = make_router(ROUTERS[name], dynamic="top_p", top_p=0.6)
    want = r(x)
    got = r.cuda()(x.cuda())  # the fused router kernels pick the candidates, the drop kernel drops
    assert torch.equal(got[1].cpu(), want[1])
    assert torch.allclose(got[0].cpu(), want[0], atol=1e-6) and torch.allclose(got[2].cpu(), want[2], atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
def test_dynamic_routing_graph_capture_matches_eager():
    r = make_router(ROUTERS["sigmoid_noaux_tc_norm"], dynamic="top_p", top_p=0.7).cuda()
    x = torch.randn(8, 32, device="cuda")
    eager = r(x)
    set_dynamic_experts(r, "top_p", top_p=0.7)  # zero the counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = r(x)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(eager, captured))
    assert dynamic_expert_stats(r)["tokens"] == 8  # one replay, counted on the device


# ------------------------------------------------------------------------------------------------ the engine
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts(seed=0, lengths=(5, 23, 11, 40)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("name", ["deepseek_v3_noaux_tc", "qwen3_moe"])
def test_engine_off_and_exact_setting_match_the_reference(name, checkpoint):
    ps = prompts()
    off = LLM(checkpoint(name), device="cpu", dtype="float32", block_size=8)
    expected = reference_generate(off.model, ps, 12)
    assert [o.token_ids for o in off.generate(ps, GREEDY)] == expected
    assert dynamic_expert_stats(off.model) is None
    exact = LLM(checkpoint(name), device="cpu", dtype="float32", block_size=8, moe_dynamic="top_p", moe_top_p=1.0)
    assert [o.token_ids for o in exact.generate(ps, GREEDY)] == expected
    k = off.model.config.num_experts_per_tok
    assert dynamic_expert_stats(exact.model)["avg_experts_per_token"] == k


def test_engine_dynamic_runs_fewer_experts_and_matches_its_own_reference(checkpoint):
    ps = prompts(1)
    llm = LLM(checkpoint("deepseek_v3_noaux_tc"), device="cpu", dtype="float32", block_size=8,
              moe_dynamic="top_p", moe_top_p=0.5)
    got = [o.token_ids for o in llm.generate(ps, GREEDY)]
    stats = dynamic_expert_stats(llm.model, reset=True)
    k = llm.model.config.num_experts_per_tok
    assert 1 <= stats["avg_experts_per_token"] < k
    assert len(stats["per_layer_avg"]) == 2  # two MoE layers (layer 0 is dense)
    assert got == reference_generate(llm.model, ps, 12)  # paged engine == contiguous reference, same routing
