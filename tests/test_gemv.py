"""Skinny GEMM (mixr.kernels.gemv): the kernels against float64 references, and the module switch.

Triton interpreter (TRITON_INTERPRET=1 with triton importable) or CUDA: both kernel paths (FMA, DOT), with and
without split-K and bias, on scaled-down DeepSeek-V2-Lite shapes and odd ones. Interpreter caveats (triton 3.6):
tl.dot on bf16 multiplies the raw bits, so the DOT path runs fp16 there; and float32 -> bf16 rounds by truncation,
so bf16 bounds leave room for that. CPU: the dispatch falls back to PyTorch bit for bit, and install_skinny on a
tiny model changes no logits, state_dict entries or gradients. CUDA: install_skinny's timing and graph capture.
"""

import copy
import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixr.layers.mlp import GatedMLP
from mixr.models import config_from_hf
from mixr.tiny import tiny_deepseek_config

gemv = importlib.import_module("mixr.kernels.gemv")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and gemv.HAS_TRITON
CUDA = torch.cuda.is_available() and gemv.HAS_TRITON and not INTERPRET
needs_kernels = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA and Triton, or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
DEV = "cuda" if CUDA else "cpu"
# relative error bounds (Frobenius) against float64: a few output roundings of the dtype
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}

# V2-Lite's dense linears (N, K) scaled down 32x (q_proj, kv_a, o_proj, shared gate/up, shared down; the dense
# MLP's gate/up and down 64x), and odd shapes: N not a multiple of BLOCK_N, K not a multiple of BLOCK_K, tiny N.
LINEAR_SHAPES = [(96, 64), (18, 64), (64, 64), (88, 64), (64, 88), (171, 32), (32, 171), (37, 80), (1, 48),
                 (13, 17)]
# paths: the rule's config, and small-tile FMA / DOT configs that take several K steps, a K tail, and split-K
PATHS = {
    "rule": None,
    "fma": dict(DOT=False, BLOCK_N=8, BLOCK_K=16, num_warps=4, num_stages=None, waves=2, MIN_STEPS=1, splits=None),
    "fma_split": dict(DOT=False, BLOCK_N=4, BLOCK_K=16, num_warps=4, num_stages=None, waves=2, MIN_STEPS=1,
                      splits=3),
    "dot": dict(DOT=True, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2, waves=2, MIN_STEPS=2, splits=None),
    "dot_split": dict(DOT=True, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, waves=2, MIN_STEPS=2, splits=2),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double().cpu() - ref.double()).norm() / ref.double().norm()).item()


def randn(*shape, seed: int) -> torch.Tensor:
    """Random inputs, never zero (an output the kernel forgot to write would not show against zeros)."""
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return t + 0.1 * torch.sign(t) + (t == 0)


# ------------------------------------------------------------------------------------------------ kernels
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K", LINEAR_SHAPES)
def test_skinny_linear_matches_float64(N, K, M, path, dtype):
    cfg = PATHS[path] or gemv.skinny_config(M, N, K)
    if cfg["BLOCK_K"] > K:
        pytest.skip("K below the config's tile")
    if not CUDA and dtype == torch.bfloat16 and cfg["DOT"]:
        pytest.skip("the interpreter's tl.dot mishandles bf16")
    x, w, b = randn(M, K, seed=M), randn(N, K, seed=N) / K**0.5, randn(N, seed=K)
    use_bias = (N + M) % 2 == 0  # half the cases, both ways for every shape over M
    ref = F.linear(x.double(), w.double(), b.double() if use_bias else None)
    xd, wd, bd = (t.to(DEV, dtype) for t in (x, w, b))
    out = gemv._launch(xd, wd, None, bd if use_bias else None, PATHS[path])
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


@needs_kernels
@pytest.mark.parametrize("path", ["fma", "fma_split", "dot", "dot_split"])
def test_skinny_linear_float32_and_strided(path):
    """float32 (exact up to summation order) on a weight whose rows are not contiguous with each other and an x
    that is a column slice, with the tail-only split (K = 80 in 5 tiles of 16, 3 splits)."""
    N, K, M = 37, 80, 5
    big = randn(N, K + 24, seed=1)
    w = big[:, 8:8 + K]
    x = randn(M, K + 8, seed=2)[:, :K]
    cfg = dict(PATHS[path], splits=3 if "split" in path else None)
    out = gemv._launch(x.to(DEV), w.to(DEV), None, None, cfg)
    # On a GPU tl.dot rounds float32 inputs to tf32 (10-bit mantissa): ~1e-3 relative, not float32's 1e-5.
    tol = 2e-3 if str(DEV).startswith("cuda") and "dot" in path else TOL[torch.float32]
    assert rel_err(out, F.linear(x.double(), w.double())) < tol


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["rule", "fma", "dot"])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("N,K", [(88, 64), (171, 32), (37, 80), (5, 33)])
def test_skinny_gate_up_matches_float64(N, K, M, path, dtype):
    cfg = PATHS[path] or gemv.skinny_config(M, N, K, gate_up=True)
    if not CUDA and dtype == torch.bfloat16 and cfg["DOT"]:
        pytest.skip("the interpreter's tl.dot mishandles bf16")
    x, wg, wu = randn(M, K, seed=M), randn(N, K, seed=N) / K**0.5, randn(N, K, seed=N + 1) / K**0.5
    ref = F.silu(F.linear(x.double(), wg.double())) * F.linear(x.double(), wu.double())
    out = gemv._launch(*(t.to(DEV, dtype) for t in (x, wg, wu)), None, PATHS[path])
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_launch_rejects_bad_inputs():  # the checks come before any Triton call: runs anywhere
    x, w = randn(9, 32, seed=0), randn(16, 32, seed=1)
    with pytest.raises(ValueError, match="rows"):
        gemv._launch(x, w, None, None, None)
    with pytest.raises(ValueError, match="contiguous along K"):
        gemv._launch(x[:2], w.t().contiguous().t(), None, None, None)
    with pytest.raises(ValueError, match="same shape"):
        gemv._launch(x[:2], w, w[:8], None, None)
    with pytest.raises(ValueError, match="BLOCK_K"):
        gemv._launch(x[:2, :16], w[:, :16], None, None, dict(PATHS["fma"], BLOCK_K=32))


@needs_kernels
@pytest.mark.parametrize("M,N,K", [(1, 576, 2048), (4, 2048, 2048)])
def test_real_shapes_with_the_h100_split_plan(M, N, K):
    """V2-Lite's kv_a (FMA, 4 splits) and o_proj (DOT, 4 splits) with the rule's tiles and the plan for 132
    multiprocessors (the interpreter's device reports 4, so the plan is forced)."""
    cfg = gemv.skinny_config(M, N, K)
    splits = gemv.split_plan(N, K, cfg, 132)[0]
    assert splits > 1
    x, w, b = randn(M, K, seed=0), randn(N, K, seed=1) / K**0.5, randn(N, seed=2)
    xd, wd, bd = (t.to(DEV, torch.float16) for t in (x, w, b))
    out = gemv._launch(xd, wd, None, bd, dict(cfg, splits=splits))
    assert rel_err(out, F.linear(x.double(), w.double(), b.double())) < TOL[torch.float16]


def test_split_plan_fills_the_gpu_only_when_tiles_are_few():
    """On 132 multiprocessors: V2-Lite's kv_a (576 rows) splits K, the larger shapes run one pass, gate_up never
    splits, and every split has whole tiles with the last one non-empty."""
    for M in (1, 8):
        for N, K in [(3072, 2048), (576, 2048), (2048, 2048), (2816, 2048), (2048, 2816), (10944, 2048),
                     (2048, 10944), (102400, 2048)]:
            cfg = gemv.skinny_config(M, N, K)
            bk = cfg["BLOCK_K"]
            assert bk & (bk - 1) == 0 and 16 <= bk <= K
            splits, per = gemv.split_plan(N, K, cfg, 132)
            steps = -(-K // bk)
            assert (splits - 1) * per < steps <= splits * per
            tiles = -(-N // cfg["BLOCK_N"])
            assert (splits > 1) == (tiles < 132)
            if splits > 1:
                assert tiles * splits >= 132
            assert gemv.split_plan(N, K, gemv.skinny_config(M, N, K, True), 132, gate_up=True)[0] == 1
    assert gemv.skinny_config(1, 576, 2048)["BLOCK_K"] == 512 and gemv.skinny_config(1, 2048, 2816)["BLOCK_K"] == 256


# ------------------------------------------------------------------------------------------------ dispatch (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_is_the_reference_bit_for_bit(dtype):
    x, w, b, wu = randn(2, 3, 48, seed=0).to(dtype), randn(40, 48, seed=1).to(dtype), randn(40, seed=2).to(dtype), \
        randn(40, 48, seed=3).to(dtype)
    assert torch.equal(gemv.skinny_linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(gemv.skinny_gate_up(x, w, wu), F.silu(F.linear(x, w)) * F.linear(x, wu))
    big = randn(3, 4, 48, seed=4).to(dtype)  # 12 rows: more than the kernels take
    assert torch.equal(gemv.skinny_linear(big, w), F.linear(big, w))
    assert [gemv.bucket(r) for r in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]


def tiny_model() -> nn.Module:
    """A tiny DeepSeek-V3 (MLA with q_lora, a dense first layer, shared experts), float32 on the CPU."""
    model = config_from_hf(tiny_deepseek_config(256, 1, 2)).build()
    model.init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    return model


def test_install_on_cpu_changes_no_value():
    model = tiny_model()
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    state = model.state_dict()
    with torch.no_grad():
        before = model(ids)
    assert gemv.install_skinny(model) == 0  # nothing the kernels can run on this CPU: nothing timed or switched
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    n_mlp = sum(type(m) is GatedMLP for m in model.modules())
    assert n_mlp >= 2  # the dense layer and the shared experts
    assert gemv.install_skinny(model, measure=False) == n_linear + n_mlp
    assert sum(type(m) is gemv.SkinnyLinear for m in model.modules()) == n_linear
    assert sum(type(m) is gemv.SkinnyGatedMLP for m in model.modules()) == n_mlp
    after_state = model.state_dict()
    assert list(after_state) == list(state)
    assert all(after_state[k] is state[k] or torch.equal(after_state[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    # training forward: autograd through the same F.linear, the same gradients
    model(ids).logsumexp(-1).mean().backward()
    plain(ids).logsumexp(-1).mean().backward()
    grads, ref = dict(model.named_parameters()), dict(plain.named_parameters())
    assert all(torch.equal(grads[k].grad, ref[k].grad) for k in ref if ref[k].grad is not None)
    assert gemv.uninstall_skinny(model) == n_linear + n_mlp
    assert not any(type(m) in (gemv.SkinnyLinear, gemv.SkinnyGatedMLP) for m in model.modules())


# ------------------------------------------------------------------------------------------------ CUDA only
V2_LITE = [(3072, 2048), (576, 2048), (2048, 2048), (2816, 2048), (2048, 2816), (10944, 2048), (2048, 10944),
           (102400, 2048)]


@needs_cuda
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("N,K", V2_LITE)
def test_v2_lite_shapes_on_cuda(N, K, M):
    """The rule's configs and split plans on the real shapes and multiprocessor count, linear and gate_up."""
    x, w, w2 = randn(M, K, seed=0), randn(N, K, seed=1) / K**0.5, randn(N, K, seed=2) / K**0.5
    xd, wd, w2d = (t.to(DEV, torch.bfloat16) for t in (x, w, w2))
    ref = F.linear(xd.float(), wd.float()).cpu()
    assert rel_err(gemv.skinny_linear(xd, wd), ref) < 1e-2
    if N in (2816, 10944):
        ref = (F.silu(F.linear(xd.float(), wd.float())) * F.linear(xd.float(), w2d.float())).cpu()
        assert rel_err(gemv.skinny_gate_up(xd, wd, w2d), ref) < 1e-2


@needs_cuda
def test_install_on_cuda_times_switches_and_captures():
    ref = tiny_model().to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 1), device="cuda")
    timed, forced = copy.deepcopy(ref), copy.deepcopy(ref)
    report = {}
    n = gemv.install_skinny(timed, report=report)
    assert report and all(set(r["us"]) == set(gemv.BUCKETS) for r in report.values())
    assert n == sum(type(m) in (gemv.SkinnyLinear, gemv.SkinnyGatedMLP) for m in timed.modules())
    assert gemv.install_skinny(forced, measure=False) > 0  # every bucket on: the kernels wherever they can run
    with torch.inference_mode():
        want = ref(ids).float()
        assert rel_err(timed(ids).float(), want.cpu()) < 3e-2
        assert rel_err(forced(ids).float(), want.cpu()) < 3e-2
        # one MLP (gate_up kernel + skinny down) captured in a CUDA graph and replayed on new input
        mlp = next(m for m in forced.modules() if type(m) is gemv.SkinnyGatedMLP)
        plain = next(m for m in ref.modules() if type(m) is GatedMLP)
        x = torch.randn(2, plain.gate_proj.in_features, device="cuda", dtype=torch.bfloat16)
        mlp(x)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = mlp(x)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out.float(), plain(x).float().cpu()) < 3e-2
    # grad enabled with weights that require grad: the PyTorch path, bit for bit
    lin = next(m for m in forced.modules() if type(m) is gemv.SkinnyLinear)
    x = torch.randn(1, lin.in_features, device="cuda", dtype=torch.bfloat16)
    lin.weight.requires_grad_(True)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
