"""Kernels: the plain-PyTorch references against float64 computations written out directly (CPU), and the Triton
kernels against the references (CUDA with Triton only)."""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mixr.kernels import fused_moe, fused_moe_ref, paged_decode_attention, paged_decode_attention_ref
# The package exports functions named like their modules, so fetch the modules themselves by name.
attn_mod = importlib.import_module("mixr.kernels.attention")
moe_mod = importlib.import_module("mixr.kernels.fused_moe")

CUDA = torch.cuda.is_available() and moe_mod.HAS_TRITON and attn_mod.HAS_TRITON
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------------------------------------ fused MoE
def moe_inputs(T, E, k, H, I, dtype=torch.float32, device="cpu", ids_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]  # distinct experts per token, repeats across tokens
    w = torch.rand(T, k, generator=g) + 0.1
    return (x.to(device, dtype), gate_up.to(device, dtype), down.to(device, dtype), ids.to(device, ids_dtype),
            w.to(device))


def moe_float64(x, gate_up, down, ids, w):
    """Token by token, expert by expert, in float64."""
    x, gate_up, down, w = x.double(), gate_up.double(), down.double(), w.double()
    I = down.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = gate_up[e] @ x[t]
            out[t] += w[t, j] * (down[e] @ (F.silu(h[:I]) * h[I:]))
    return out


@pytest.mark.parametrize("T,E,k,H,I", [(1, 8, 2, 32, 24), (7, 8, 3, 48, 40), (33, 16, 4, 64, 24)])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_fused_moe_ref_matches_float64(T, E, k, H, I, ids_dtype):
    args = moe_inputs(T, E, k, H, I, ids_dtype=ids_dtype)
    ref = moe_float64(*args)
    assert rel_err(fused_moe_ref(*args), ref) < 1e-5
    assert rel_err(fused_moe(*args), ref) < 1e-5  # the CPU path is the reference


def test_fused_moe_ref_bf16_close_to_float64():
    x, gu, dn, ids, w = moe_inputs(9, 8, 2, 64, 48)
    ref = moe_float64(x, gu, dn, ids, w)
    out = fused_moe_ref(x.bfloat16(), gu.bfloat16(), dn.bfloat16(), ids, w)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


def test_fused_moe_checks_inputs():
    x, gu, dn, ids, w = moe_inputs(3, 4, 2, 16, 8)
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_moe(x, gu, dn[:, :, :4], ids, w)
    with pytest.raises(ValueError, match="must both be"):
        fused_moe(x, gu, dn, ids[:2], w[:2].clone())
    with pytest.raises(TypeError, match="int32 or int64"):
        fused_moe(x, gu, dn, ids.float(), w)
    with pytest.raises(TypeError, match="float32"):
        fused_moe(x, gu, dn, ids, w.double())
    with pytest.raises(TypeError, match="one floating dtype"):
        fused_moe(x.bfloat16(), gu, dn, ids, w)
    with pytest.raises(ValueError, match="only 4 experts"):
        fused_moe_ref(x, gu, dn, ids + 3, w)


def test_moe_configs_cover_every_batch():
    for H, I in list(moe_mod.MOE_CONFIGS) + [(64, 32)]:
        for T in (1, 2, 8, 9, 32, 33, 256, 257, 2048, 100000):
            assert moe_mod.moe_config(T, H, I)["path"] in ("gemv", "gemm")


# ------------------------------------------------------------------------------------------------ paged attention
def paged_inputs(B, lens, Hq, Hkv, Dk, Dv, bs, mla=False, dtype=torch.float32, device="cpu", seed=0):
    """Random contiguous per-sequence K/V, scattered into a paged cache through shuffled block tables.

    Returns the paged arguments and the contiguous (B, S, Hkv, D) tensors they were built from. Unused cache blocks
    hold NaN: a kernel that reads past a sequence's length, or through a stale table entry, poisons its output.
    """
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max(math.ceil(n / bs) for n in lens)) + 1  # one spare table column per row
    S = max_blocks * bs
    num_blocks = B * max_blocks + 3
    k = torch.randn(B, S, Hkv, Dk, generator=g)
    v = k[..., :Dv] if mla else torch.randn(B, S, Hkv, Dv, generator=g)
    q = torch.randn(B, Hq, Dk, generator=g)
    k_cache = torch.full((num_blocks, bs, Hkv, Dk), float("nan"))
    v_cache = None if mla else torch.full((num_blocks, bs, Hkv, Dv), float("nan"))
    tables = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks)
    for b in range(B):
        for i in range(math.ceil(lens[b] / bs)):
            n = min(bs, lens[b] - i * bs)
            k_cache[tables[b, i], :n] = k[b, i * bs:i * bs + n]
            if not mla:
                v_cache[tables[b, i], :n] = v[b, i * bs:i * bs + n]
    k_cache = k_cache.to(device, dtype)
    v_cache = k_cache[..., :Dv] if mla else v_cache.to(device, dtype)  # MLA: V is a strided view of K
    args = (q.to(device, dtype), k_cache, v_cache, tables.to(device, torch.int32),
            torch.tensor(lens, dtype=torch.int32, device=device))
    return args, k, v


def attention_float64(q, k, v, lens, scale):
    """Contiguous, unpaged: softmax over each sequence's first lens[b] tokens, in float64."""
    B, Hq, _ = q.shape
    Hkv = k.shape[2]
    out = torch.zeros(B, Hq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        n = lens[b]
        if n == 0:
            continue
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            s = (k[b, :n, kv].double() @ q[b, h].double()) * scale
            out[b, h] = s.softmax(0) @ v[b, :n, kv].double()
    return out


ATTN_LAYOUTS = {  # name -> (Hq, Hkv, Dk, Dv, mla)
    "gqa": (8, 2, 32, 32, False),
    "mha": (4, 4, 16, 24, False),
    "mla": (16, 1, 72, 64, True),  # [latent 64 | rope 8], V = the latent
}


@pytest.mark.parametrize("layout", list(ATTN_LAYOUTS))
@pytest.mark.parametrize("bs", [4, 16])
def test_paged_attention_ref_matches_float64(layout, bs):
    Hq, Hkv, Dk, Dv, mla = ATTN_LAYOUTS[layout]
    lens = [1, 37, 0, 2 * bs]  # not multiples of the block size, an empty one, an exact one
    args, k, v = paged_inputs(len(lens), lens, Hq, Hkv, Dk, Dv, bs, mla)
    ref = attention_float64(args[0], k, v, lens, 0.3)
    out = paged_decode_attention_ref(*args, 0.3)
    assert out.shape == (len(lens), Hq, Dv)
    assert rel_err(out, ref) < 1e-5
    assert (out[2] == 0).all()
    assert rel_err(paged_decode_attention(*args, 0.3), ref) < 1e-5  # the CPU path is the reference
    assert rel_err(paged_decode_attention_ref(*args, 0.3, max_context_len=max(lens)), ref) < 1e-5


def test_paged_attention_ref_bf16():
    Hq, Hkv, Dk, Dv, mla = ATTN_LAYOUTS["mla"]
    lens = [5, 60]
    args, k, v = paged_inputs(2, lens, Hq, Hkv, Dk, Dv, 16, mla, dtype=torch.bfloat16)
    ref = attention_float64(args[0].float(), k.bfloat16().float(), v.bfloat16().float(), lens, 0.2)
    out = paged_decode_attention_ref(*args, 0.2)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2


def test_paged_attention_ref_projects_heads():
    """v_proj (absorbed MLA's W_UV): each head's output times its own (Dp, Dv) matrix."""
    Hq, Hkv, Dk, Dv, mla = ATTN_LAYOUTS["mla"]
    lens = [5, 0, 40]
    args, k, v = paged_inputs(3, lens, Hq, Hkv, Dk, Dv, 16, mla)
    w = torch.randn(Hq, 24, Dv, generator=torch.Generator().manual_seed(7)) / Dv**0.5
    want = torch.einsum("bhd,hpd->bhp", attention_float64(args[0], k, v, lens, 0.3), w.double())
    out = paged_decode_attention(*args, 0.3, v_proj=w)
    assert out.shape == (3, Hq, 24) and (out[1] == 0).all()
    assert rel_err(out, want) < 1e-5
    with pytest.raises(ValueError, match="v_proj"):
        paged_decode_attention(*args, 0.3, v_proj=w[:, :, 1:])


def test_paged_attention_checks_inputs():
    (q, kc, vc, bt, cl), _, _ = paged_inputs(2, [3, 4], 8, 2, 16, 16, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_decode_attention(q[:, :7], kc, vc, bt, cl, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        paged_decode_attention(q[..., :8], kc, vc, bt, cl, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, kc, vc, bt[:1], cl, 1.0)
    with pytest.raises(TypeError, match="integer"):
        paged_decode_attention(q, kc, vc, bt.float(), cl, 1.0)
    with pytest.raises(TypeError, match="one floating dtype"):
        paged_decode_attention(q.half(), kc, vc, bt, cl, 1.0)


# ------------------------------------------------------------------------------------------------ CUDA: Triton
MOE_CONFIGS_TO_TRY = {
    "default": None,
    "gemv_fused_k": dict(path="gemv", UP_N=16, UP_K=256, DOWN_N=16, DOWN_K=128, FUSE_K=True, num_warps=4),
    "gemv_per_pair": dict(path="gemv", UP_N=8, UP_K=128, DOWN_N=16, DOWN_K=256, FUSE_K=False, num_warps=4),
    "gemm_bm16": moe_mod._gemm(16, (64, 128, 1, 4, 4), (64, 128, 1, 4, 4)),
    "gemm_bm64": moe_mod._gemm(64, (128, 64, 8, 4, 4), (64, 64, 8, 4, 4)),
}


@needs_cuda
@pytest.mark.parametrize("config", list(MOE_CONFIGS_TO_TRY))
@pytest.mark.parametrize("T,E,k,H,I", [(1, 64, 6, 256, 176), (8, 16, 4, 128, 96), (70, 10, 3, 320, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_moe_triton_matches_ref(config, T, E, k, H, I, dtype):
    x, gu, dn, ids, w = moe_inputs(T, E, k, H, I, dtype, "cuda", torch.int32, seed=T)
    ref = fused_moe_ref(x.float(), gu.float(), dn.float(), ids, w)
    out = fused_moe(x, gu, dn, ids, w, config=MOE_CONFIGS_TO_TRY[config])
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel_err(out, ref) < 2e-2


@needs_cuda
def test_fused_moe_triton_cuda_graph():
    x, gu, dn, ids, w = moe_inputs(40, 16, 4, 128, 96, torch.bfloat16, "cuda", torch.int64)
    fused_moe(x, gu, dn, ids, w)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, gu, dn, ids, w)
    x2, _, _, ids2, w2 = moe_inputs(40, 16, 4, 128, 96, torch.bfloat16, "cuda", torch.int64, seed=1)
    x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
    graph.replay()
    assert rel_err(out, fused_moe_ref(x.float(), gu.float(), dn.float(), ids, w)) < 2e-2


# ------------------------------------------------------------------------------------------------ shared expert
INTERPRET = moe_mod.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


def shared_inputs(H, Is, dtype=torch.float32, device="cpu", seed=5):
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(Is, H, generator=g) / H**0.5 for _ in range(2))
    down = torch.randn(H, Is, generator=g) / Is**0.5
    return tuple(t.to(device, dtype) for t in (gate, up, down))


def shared_float64(x, shared):
    gate, up, down = (t.double() for t in shared)
    x = x.double()
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def test_fused_moe_shared_reference_and_checks():
    x, gu, dn, ids, w = moe_inputs(5, 8, 2, 32, 24)
    shared = shared_inputs(32, 48)
    want = moe_float64(x, gu, dn, ids, w) + shared_float64(x, shared)
    assert rel_err(fused_moe(x, gu, dn, ids, w, shared=shared), want) < 1e-5
    with pytest.raises(ValueError, match="shared expert weights"):
        fused_moe(x, gu, dn, ids, w, shared=(shared[0], shared[1], shared[2].T))


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA and Triton, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("fuse_k", [False, True])
@pytest.mark.parametrize("T,E,k,H,I,S", [(1, 8, 3, 48, 40, 2), (5, 8, 2, 64, 24, 1), (8, 16, 4, 40, 32, 3)])
def test_fused_moe_gemv_runs_shared_expert(fuse_k, T, E, k, H, I, S):
    """The shared expert as S more pairs per token inside the GEMV kernels, with a dropped routed pair (-1)."""
    x, gu, dn, ids, w = moe_inputs(T, E, k, H, I, seed=T + S)
    ids[0, -1] = -1
    shared = shared_inputs(H, S * I, seed=S)
    keep = ids >= 0
    want = moe_float64(x, gu, dn, ids.clamp(min=0), w * keep) + shared_float64(x, shared)
    cfg = dict(path="gemv", UP_N=8, UP_K=32, DOWN_N=16, DOWN_K=16, FUSE_K=fuse_k, num_warps=4)
    if CUDA:
        args = [t.cuda() for t in (x.bfloat16(), gu.bfloat16(), dn.bfloat16(), ids, w)]
        sh = tuple(t.cuda().bfloat16() for t in shared)
        out = fused_moe(*args, config=cfg, shared=sh).float().cpu()
        tol = 2e-2
    else:  # the interpreter runs the kernels on CPU tensors, in float32
        out = moe_mod._fused_moe_gemv(x, gu, dn, ids.contiguous(), w, T, H, I, k, cfg, shared)
        tol = 1e-5
    assert rel_err(out, want) < tol


@needs_cuda
def test_moe_layer_fuses_shared_expert_on_gpu():
    """MoE.forward on a GPU at decode batch sizes runs the shared expert in the routed kernels; same result as the
    separate shared MLP, and a hook on the shared expert turns the fusion off (calibration must see it run)."""
    from mixr.layers.moe import MoE, RouterOptions
    torch.manual_seed(0)
    moe = MoE(256, 176, RouterOptions(num_experts=16, top_k=4), shared_intermediate_size=352).cuda().bfloat16()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert moe._fused_shared(x) is not None
        fused = moe(x).float()
        w, ids, _ = moe.gate(x)
        separate = (fused_moe_ref(x.float(), moe.experts.gate_up_proj.float(), moe.experts.down_proj.float(), ids, w)
                    + moe.shared_experts.float()(x.float()))
        moe.bfloat16()
        seen = []
        moe.shared_experts.register_forward_hook(lambda m, a, o: seen.append(1))
        assert moe._fused_shared(x) is None
        hooked = moe(x).float()
    assert seen and rel_err(fused, separate) < 2e-2 and rel_err(hooked, separate) < 2e-2


ATTN_CUDA_LAYOUTS = {
    "qwen3_gqa": (32, 4, 128, 128, False),
    "v2_lite_mla": (16, 1, 576, 512, True),
    "gqa_odd_dims": (6, 2, 80, 48, False),
}


@needs_cuda
@pytest.mark.parametrize("layout", list(ATTN_CUDA_LAYOUTS))
@pytest.mark.parametrize("bs", [16, 64])
@pytest.mark.parametrize("lens", [[1], [1000], [77, 0, 300, 16, 5]])
@pytest.mark.parametrize("splits", ["default", "many", "one"])
def test_paged_attention_triton_matches_ref(layout, bs, lens, splits):
    Hq, Hkv, Dk, Dv, mla = ATTN_CUDA_LAYOUTS[layout]
    args, _, _ = paged_inputs(len(lens), lens, Hq, Hkv, Dk, Dv, bs, mla, torch.bfloat16, "cuda")
    q, kc, vc, bt, cl = args
    ref = paged_decode_attention_ref(q.float(), kc.float(), kc.float()[..., :Dv] if mla else vc.float(), bt, cl, 0.1)
    cfg = {"default": None, "many": dict(BLOCK_N=16, BLOCK_H=16, waves=16, MIN_SPLIT=16, num_warps=4, num_stages=2),
           "one": dict(BLOCK_N=32, BLOCK_H=16, waves=0, MIN_SPLIT=16, num_warps=4, num_stages=2)}[splits]
    out = paged_decode_attention(q, kc, vc, bt, cl, 0.1, config=cfg)
    assert out.shape == (len(lens), Hq, Dv)
    if any(lens):
        assert rel_err(out, ref) < 2e-2
    assert all((out[b] == 0).all() for b, n in enumerate(lens) if n == 0)


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA and Triton, or TRITON_INTERPRET=1")
@pytest.mark.parametrize("lens", [[1], [1000], [77, 0, 300, 16, 5], [9] * 12])
@pytest.mark.parametrize("splits", ["default", "many", "one"])
def test_paged_attention_merges_and_projects_heads(lens, splits):
    """The split merge and W_UV in one kernel (batches up to PROJ_CONFIG's max_batch; larger ones merge, then one
    bmm) against attention in float64 followed by the projection."""
    Hq, Hkv, Dk, Dv = (16, 1, 576, 512) if CUDA else (16, 1, 72, 64)
    dtype, device = (torch.bfloat16, "cuda") if CUDA else (torch.float32, "cpu")
    args, k, v = paged_inputs(len(lens), lens, Hq, Hkv, Dk, Dv, 16, True, dtype, device, seed=len(lens))
    w = torch.randn(Hq, 128 if CUDA else 40, Dv, generator=torch.Generator().manual_seed(3)) / Dv**0.5
    want = torch.einsum("bhd,hpd->bhp", attention_float64(args[0].cpu(), k.to(dtype).double(), v.to(dtype).double(),
                                                          lens, 0.1), w.to(dtype).double())
    w_t = w.to(device, dtype).transpose(1, 2).contiguous().transpose(1, 2)  # strided, as w_kv[:, dn:] is
    cfg = {"default": attn_mod.ATTN_CONFIGS["mla"],
           "many": dict(BLOCK_N=16, BLOCK_H=16, waves=16, MIN_SPLIT=16, num_warps=4, num_stages=2),
           "one": dict(BLOCK_N=32, BLOCK_H=16, waves=0, MIN_SPLIT=16, num_warps=4, num_stages=2)}[splits]
    # several tiles of each; batches up to 8 fused, so the 12-row case takes the merge-then-bmm path
    proj = dict(attn_mod.PROJ_CONFIG, BLOCK_D=32 if CUDA else 16, BLOCK_S=4, max_batch=8)
    max_ctx = args[3].shape[1] * 16
    out = attn_mod._paged_decode_triton(*args, 0.1, max_ctx, cfg, 132, 1.0, w_t, proj)
    assert out.shape == (len(lens), Hq, w.shape[1])
    assert all((out[b] == 0).all() for b, n in enumerate(lens) if n == 0)
    assert rel_err(out.cpu(), want) < (2e-2 if CUDA else 1e-5)
    if CUDA:  # the public entry point, default configs
        assert rel_err(paged_decode_attention(*args, 0.1, v_proj=w_t).cpu(), want) < 2e-2


@needs_cuda
def test_paged_attention_triton_fp16_and_cuda_graph():
    Hq, Hkv, Dk, Dv, mla = ATTN_CUDA_LAYOUTS["v2_lite_mla"]
    lens = [200, 3, 150]
    (q, kc, vc, bt, cl), _, _ = paged_inputs(3, lens, Hq, Hkv, Dk, Dv, 16, mla, torch.float16, "cuda")
    kc.nan_to_num_(0.0)  # the graph replays on new lengths, which may reach blocks left unwritten above
    paged_decode_attention(q, kc, vc, bt, cl, 0.1)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, kc, vc, bt, cl, 0.1)
    cl.copy_(torch.tensor([17, 208, 1], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    graph.replay()
    ref = paged_decode_attention_ref(q.float(), kc.float(), kc.float()[..., :Dv], bt, cl, 0.1)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 2e-2
