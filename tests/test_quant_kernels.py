"""Quantized-weight, FP8 and FP8-KV kernels.

CPU: the plain-PyTorch references against float64 computations written from the formats' definitions, and the FP8
KV cache end to end in the engine. Triton interpreter (TRITON_INTERPRET=1 with triton importable): the Triton
kernels on CPU tensors against the references. CUDA: the same on the GPU, plus CUDA-graph capture.
Interpreter caveats (triton 3.6): tl.dot on bf16 multiplies the raw bits, so dot kernels run fp16 there; and its
float -> fp8 rounding does not carry into the exponent, so FP8 kernels run on activations that quantize exactly.
"""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mixr.kernels.quant_gemm import (
    dequantize,
    pack_int4,
    quant_linear,
    quant_linear_ref,
    unpack_int4,
)
from mixr.kv_cache import ContiguousCache, dequantize_kv, to_kv

# The package exports functions named like their modules, so fetch the modules themselves by name.
qg = importlib.import_module("mixr.kernels.quant_gemm")
fm = importlib.import_module("mixr.kernels.fused_moe")
f8 = importlib.import_module("mixr.kernels.fp8")
attn = importlib.import_module("mixr.kernels.attention")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and qg.HAS_TRITON
CUDA = torch.cuda.is_available() and qg.HAS_TRITON and not INTERPRET
FP8_CORES = CUDA and torch.cuda.get_device_capability() >= (8, 9)
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 and triton")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
needs_fp8_cores = pytest.mark.skipif(not FP8_CORES, reason="needs CUDA capability 8.9+ and Triton")
E4M3 = torch.float8_e4m3fn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------------------------------------ packed weights
def quant_weight(shape, bits, group=None, zero_point=False, dtype=torch.float32, device="cpu", seed=0):
    """Random codes and scales in the packed format, and the float64 weight they stand for, built element by element
    from the format's definition (not through `dequantize`)."""
    g = torch.Generator().manual_seed(seed)
    *lead, N, K = shape
    if bits == 8:
        q = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        s = (torch.rand(*lead, N, 1, generator=g) + 0.5) / (64 * K**0.5)
        w64 = q.double() * s.to(dtype).double()
        return (q.to(device), s.to(device, dtype), None), w64
    G = group
    codes = torch.randint(0, 16, shape, generator=g)
    s = (torch.rand(*lead, N, K // G, generator=g) + 0.5) / (4 * K**0.5)
    z = torch.randint(0, 16, (*lead, N, K // G), generator=g, dtype=torch.uint8) if zero_point else None
    zk = (z.double() if zero_point else torch.full(s.shape, 8.0, dtype=torch.float64)).repeat_interleave(G, -1)
    w64 = (codes.double() - zk) * s.to(dtype).double().repeat_interleave(G, -1)
    packed = torch.zeros(*lead, N, K // 2, dtype=torch.uint8)
    for j in range(K // 2):  # byte j: k = 2j in the low nibble, k = 2j + 1 in the high one
        packed[..., j] = (codes[..., 2 * j] + 16 * codes[..., 2 * j + 1]).to(torch.uint8)
    return (packed.to(device), s.to(device, dtype), None if z is None else z.to(device)), w64


QUANT_KINDS = {"int4_g64": (4, 64, False), "int4_g128_zp": (4, 128, True), "int8": (8, None, False)}


@pytest.mark.parametrize("kind", list(QUANT_KINDS))
def test_dequantize_matches_the_format(kind):
    bits, G, zp = QUANT_KINDS[kind]
    (q, s, z), w64 = quant_weight((3, 40, 256), bits, G, zp)
    assert torch.allclose(dequantize(q, s, z, bits, torch.float64), w64, rtol=2**-23, atol=0)  # fp32 products
    if bits == 4:
        assert torch.equal(pack_int4(unpack_int4(q)), q)


@pytest.mark.parametrize("kind", list(QUANT_KINDS))
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_ref_matches_float64(kind, bias):
    bits, G, zp = QUANT_KINDS[kind]
    (q, s, z), w64 = quant_weight((48, 256), bits, G, zp)
    x = torch.randn(5, 256)
    b = torch.randn(48) if bias else None
    ref = x.double() @ w64.T + (b.double() if bias else 0)
    assert rel_err(quant_linear_ref(x, q, s, z, bits, b), ref) < 1e-6
    assert rel_err(quant_linear(x, q, s, z, bits, b), ref) < 1e-6  # the CPU path is the reference


def moe_quant_inputs(T, E, k, H, I, bits, G, zp, dtype=torch.float32, device="cpu", seed=0, skip=True):
    g = torch.Generator().manual_seed(seed)
    gu, gu64 = quant_weight((E, 2 * I, H), bits, G, zp, dtype, device, seed)
    dn, dn64 = quant_weight((E, H, I), bits, G, zp, dtype, device, seed + 1)
    x = torch.randn(T, H, generator=g)
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    if skip and T * k > 1:
        ids[0, -1] = -1  # a skipped pair (dynamic routing)
    w = torch.rand(T, k, generator=g) + 0.1
    return (x.to(device, dtype), gu, dn, ids.to(device, torch.int32), w.to(device)), (gu64, dn64)


def moe_float64(x, gu64, dn64, ids, w):
    I = dn64.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = gu64[e] @ x[t].double()
            out[t] += float(w[t, j]) * (dn64[e] @ (F.silu(h[:I]) * h[I:]))
    return out


@pytest.mark.parametrize("kind", list(QUANT_KINDS))
@pytest.mark.parametrize("T", [1, 7])
def test_fused_moe_quant_ref_matches_float64(kind, T):
    bits, G, zp = QUANT_KINDS[kind]
    args, (gu64, dn64) = moe_quant_inputs(T, 8, 3, 256, 128, bits, G, zp)
    ref = moe_float64(args[0], gu64, dn64, args[3], args[4])
    assert rel_err(fm.fused_moe_quant_ref(*args, bits), ref) < 1e-5
    assert rel_err(fm.fused_moe_quant(*args, bits), ref) < 1e-5  # the CPU path is the reference


def test_fused_moe_quant_checks_inputs():
    (x, gu, dn, ids, w), _ = moe_quant_inputs(3, 4, 2, 128, 128, 4, 64, False)
    with pytest.raises(ValueError, match="shape mismatch"):
        fm.fused_moe_quant(x, gu, (dn[0][:, :64], dn[1][:, :64], None), ids, w, 4)
    with pytest.raises(TypeError, match="qweight must be"):
        fm.fused_moe_quant(x, gu, dn, ids, w, 8)
    with pytest.raises(ValueError, match="must both be"):
        fm.fused_moe_quant(x, gu, dn, ids[:2], w[:2].clone(), 4)
    with pytest.raises(ValueError, match="only 4 experts"):
        fm.fused_moe_quant_ref(x, gu, dn, ids.abs() + 3, w, 4)


# ------------------------------------------------------------------------------------------------ FP8 linear
def fp8_weight(N, K, block=(128, 128), seed=0):
    """An e4m3 weight with per-block scales, and its float64 value."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 64).clamp(-448, 448).to(E4M3)
    s = torch.rand(-(-N // block[0]), -(-K // block[1]), generator=g) / (64 * K**0.5) + 1e-4
    w64 = w.double() * s.double().repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)[:, :K]
    return w, s, w64


def exact_activations(M, K, block=128, seed=0):
    """Activations that act_quant maps to e4m3 without rounding: e4m3 values with one +-448 per group, times a
    power of two per group (exact in fp16/bf16 too)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(M, K, generator=g) * 100).clamp(-448, 448).to(E4M3).float()
    q[:, ::block] = 448.0
    s = 2.0 ** torch.randint(-14, -8, (M, -(-K // block)), generator=g).float()
    return q * s.repeat_interleave(block, 1)[:, :K]


def test_fp8_block_linear_ref_matches_float64():
    w, s, w64 = fp8_weight(200, 320)  # partial edge blocks along both N and K
    x = torch.randn(5, 320)
    assert rel_err(f8.fp8_block_linear_ref(x, w, s), x.double() @ w64.T) < 1e-6
    assert rel_err(f8.fp8_block_linear(x, w, s), x.double() @ w64.T) < 1e-6  # the CPU path is the reference


def test_act_quant_ref():
    x = torch.randn(4, 320) * torch.logspace(-3, 2, 4)[:, None]
    x[1, 128:256] = 0.0  # an all-zero group must not divide by zero
    q, s = f8.act_quant_ref(x)
    assert q.dtype == E4M3 and s.shape == (4, 3)
    back = q.float() * s.repeat_interleave(128, 1)[:, :320]
    assert torch.isfinite(back).all() and (back[1, 128:256] == 0).all()
    amax = F.pad(x.abs(), (0, 64)).view(4, 3, 128).amax(-1)
    assert torch.allclose(s[amax > 0], amax[amax > 0] / 448)
    # e4m3 rounds to 3 mantissa bits: error <= 2^-4 relative in the normal range, 2^-10 * scale absolute below it
    err = (back - x).abs()
    bound = torch.maximum(x.abs() * 2**-4, s.repeat_interleave(128, 1)[:, :320] * 2**-10)
    assert (err <= bound * 1.0001).all()


# ------------------------------------------------------------------------------------------------ FP8 KV cache
def test_fp8_kv_round_trip():
    x = torch.randn(1000) * 4
    x[:3] = torch.tensor([1000.0, -1e6, 0.0])
    for scale in (1.0, 0.25):
        back = dequantize_kv(to_kv(x, E4M3, scale), torch.float32, scale)
        assert torch.isfinite(back).all()
        assert back[0] == 448 * scale and back[1] == -448 * scale  # saturates (e4m3fn has no inf)
        normal = (x.abs() / scale >= 2**-6) & (x.abs() / scale <= 448)
        assert ((back - x).abs()[normal] <= x.abs()[normal] * 2**-4).all()
    assert dequantize_kv(to_kv(x, torch.bfloat16), torch.float32) is not None  # unquantized caches: a cast


def paged_cache_inputs(lens, Hq, Hkv, Dk, Dv, bs, mla, seed=0):
    """Random K/V (N(0, 1)) in a paged cache with shuffled block tables; returns the args and the contiguous K/V."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    max_blocks = max(math.ceil(n / bs) for n in lens) + 1
    num_blocks = B * max_blocks + 2
    k = torch.randn(num_blocks, bs, Hkv, Dk, generator=g)
    v = k[..., :Dv] if mla else torch.randn(num_blocks, bs, Hkv, Dv, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks).to(torch.int32)
    q = torch.randn(B, Hq, Dk, generator=g)
    return q, k, v, tables, torch.tensor(lens, dtype=torch.int32)


ATTN_LAYOUTS = {"mla": (16, 1, 72, 64, True), "gqa": (8, 2, 32, 32, False)}


@pytest.mark.parametrize("layout", list(ATTN_LAYOUTS))
def test_fp8_kv_attention_error_bound(layout):
    """Attention over an e4m3 cache vs the exact one. Bound: each cached entry is off by <= 2^-4 relative (rms
    about 2.6% for normal-range values); V's errors move the output by about that fraction, and K's move each
    logit by ~2.6% of its std (here 1, q and k ~ N(0, 1) at scale 1/sqrt(Dk)), which moves the softmax average
    by about as much again: sqrt(2) * 2.6% = 3.7% expected, bounded at twice that."""
    Hq, Hkv, Dk, Dv, mla = ATTN_LAYOUTS[layout]
    q, k, v, bt, cl = paged_cache_inputs([1, 50, 333, 17], Hq, Hkv, Dk, Dv, 16, mla)
    scale = Dk**-0.5
    k8 = to_kv(k, E4M3)
    v8 = k8[..., :Dv] if mla else to_kv(v, E4M3)
    exact = attn.paged_decode_attention_ref(q.double(), k.double(), v.double(), bt, cl, scale)
    out = attn.paged_decode_attention(q, k8, v8, bt, cl, scale)  # CPU: the reference, dequantizing
    err = rel_err(out, exact)
    print(f"fp8 KV attention ({layout}): relative error {err:.4f}")
    assert 5e-3 < err < 0.075  # nonzero: the cache really is quantized
    # The reference on the e4m3 cache is the exact attention over the dequantized entries.
    deq = attn.paged_decode_attention_ref(q.double(), k8.double(), (k8[..., :Dv] if mla else v8).double(), bt, cl,
                                          scale)
    assert rel_err(out, deq) < 1e-6
    # A per-tensor scale is applied on both sides.
    k8s = to_kv(k, E4M3, 0.5)
    out_s = attn.paged_decode_attention(q, k8s, k8s[..., :Dv] if mla else to_kv(v, E4M3, 0.5), bt, cl, scale,
                                        kv_scale=0.5)
    assert rel_err(out_s, exact) < 0.075


def greedy_with_cache(model, prompt: list[int], steps: int, kv_dtype=None, forced: list[int] | None = None):
    """The reference path (contiguous cache, expanded MLA) on one prompt: greedy tokens and each step's logits.
    forced: feed these tokens instead of the argmax (teacher forcing), to compare logits step by step."""
    cache = ContiguousCache(len(model.model.layers), 1, len(prompt) + steps, model.config.cache_shapes(),
                            torch.float32, "cpu", kv_dtype=kv_dtype)
    ids = torch.tensor([prompt])
    cache.length = len(prompt)
    logits = [model.lm_head(model.hidden_states(ids, torch.arange(len(prompt))[None], cache)[:, -1])[0]]
    tokens = []
    for i in range(steps):
        tokens.append(int(logits[-1].argmax()) if forced is None else forced[i])
        if i == steps - 1:
            break
        cache.length = len(prompt) + i + 1
        pos = torch.tensor([[len(prompt) + i]])
        logits.append(model.lm_head(model.hidden_states(torch.tensor([[tokens[-1]]]), pos, cache)[:, -1])[0])
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("name", ["deepseek_v3_noaux_tc", "qwen3_moe"])
@torch.inference_mode()
def test_engine_fp8_kv_cache(name, checkpoint):
    from conftest import VOCAB

    from mixr import LLM, SamplingParams

    path = checkpoint(name)
    budget = 1 << 20
    auto = LLM(path, device="cpu", dtype="float32", block_size=8, kv_cache_bytes=budget)
    fp8 = LLM(path, device="cpu", dtype="float32", block_size=8, kv_cache_bytes=budget, kv_cache_dtype="fp8")
    assert fp8.engine.runner.cache.layers[0][0].dtype == E4M3
    # fp32 -> e4m3: 4x the tokens in the same bytes (bf16 -> e4m3: 2x)
    assert fp8.engine.runner.kv_bytes_per_token * 4 == auto.engine.runner.kv_bytes_per_token
    assert fp8.engine.runner.num_blocks >= 4 * auto.engine.runner.num_blocks
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 23, 40)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out_auto = [o.token_ids for o in auto.generate(prompts, params)]
    out_fp8 = [o.token_ids for o in fp8.generate(prompts, params)]
    # The engine (paged, absorbed-MLA decode, fp8 kernel path) and the reference over an e4m3 contiguous cache read
    # the same quantized entries: they agree token for token, as the float paths do.
    assert out_fp8 == [greedy_with_cache(fp8.model, p, 12, E4M3)[0] for p in prompts]
    # Against the unquantized cache: reported, not asserted (these random tiny models route on knife edges, so a
    # small perturbation can flip an expert); the bound is asserted on attention itself, above.
    agree = sum(a == b for x, y in zip(out_auto, out_fp8) for a, b in zip(x, y)) / sum(map(len, out_auto))
    errs, same_top1 = [], []
    for p, toks in zip(prompts, out_auto):  # teacher-forced on the auto tokens, so the steps line up
        _, la = greedy_with_cache(auto.model, p, 12, forced=toks)
        _, lf = greedy_with_cache(auto.model, p, 12, E4M3, forced=toks)
        errs.append((lf - la).norm(dim=-1) / la.norm(dim=-1))
        same_top1.append(lf.argmax(-1) == la.argmax(-1))
    errs, same_top1 = torch.cat(errs), torch.cat(same_top1).float().mean()
    print(f"\n{name}: fp8 KV vs auto: greedy token agreement {agree:.2f} (a first difference changes the rest); "
          f"teacher-forced: same top-1 {same_top1:.2f}, relative logit error median {errs.median():.4f}, "
          f"max {errs.max():.4f}")


# ------------------------------------------------------------------------------------------------ Triton: interpreter
def quant_case(kind, M, N, K, dtype, cfg, bias=True, seed=0, device="cpu"):
    """Relative error of quant_linear_triton (config cfg) against the reference in fp32."""
    bits, G, zp = QUANT_KINDS[kind]
    (q, s, z), w64 = quant_weight((N, K), bits, G, zp, dtype, device, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    out = qg.quant_linear_triton(x, q, s, z, bits, b, cfg)
    ref = quant_linear_ref(x.float(), q, s.float(), z, bits, None if b is None else b.float())
    assert out.dtype == dtype and out.shape == (M, N)
    return rel_err(out, ref)


INTERP_QUANT_CONFIGS = {  # name -> (M, config, activation dtype): gemv runs bf16 (no dot), gemm fp16 (see above)
    "gemv_m1": (1, None, torch.bfloat16),
    "gemv_m3_splitk": (3, qg._gemv(8, 256, waves=50, min_steps=1), torch.bfloat16),
    "gemv_m2_pipelined": (2, qg._gemv(8, 128, pipe=3), torch.bfloat16),
    "gemm_m20_splitk": (20, qg._gemm(16, 32, bk=64, group_m=2, waves=50, min_steps=1), torch.float16),
    "gemm_m70": (70, qg._gemm(32, 32, bk=64, group_m=2, min_steps=1 << 20), torch.float16),
    "dequant_m40": (40, dict(path="dequant"), torch.float16),
}


@needs_interpreter
@pytest.mark.parametrize("kind", list(QUANT_KINDS))
@pytest.mark.parametrize("config", list(INTERP_QUANT_CONFIGS))
def test_quant_linear_interpreter(kind, config):
    M, cfg, dtype = INTERP_QUANT_CONFIGS[config]
    # N = 40: not a multiple of the tiles (wrapped rows); K = 384: the int4 g128 gemv's last tile holds one group
    assert quant_case(kind, M, 40, 384, dtype, cfg) < 1e-2


@needs_interpreter
@pytest.mark.parametrize("kind", list(QUANT_KINDS))
def test_dequantize_interpreter(kind):
    bits, G, zp = QUANT_KINDS[kind]
    (q, s, z), w64 = quant_weight((40, 384), bits, G, zp, torch.float16)
    out = qg.dequantize_triton(q, s, z, bits, torch.float32)
    assert out.shape == w64.shape and torch.allclose(out.double(), w64, rtol=2**-23, atol=0)


@needs_interpreter
@pytest.mark.parametrize("kind", list(QUANT_KINDS))
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_fused_moe_quant_interpreter(kind, path):
    bits, G, zp = QUANT_KINDS[kind]
    T, cfg = (3, fm._qgemv(8, 256, 32, 128)) if path == "gemv" else (
        20, fm._qgemm(16, (32, 64, 2, 4, 2), (64, 64, 1, 4, 2)))
    args, _ = moe_quant_inputs(T, 8, 2, 256, 128, bits, G, zp, torch.float16)
    x, (gq, gs, gz), (dq, ds, dz), ids, w = args
    out = fm.fused_moe_quant_triton(*args, bits, cfg)
    ref = fm.fused_moe_quant_ref(x.float(), (gq, gs.float(), gz), (dq, ds.float(), dz), ids, w, bits)
    assert out.shape == x.shape and rel_err(out, ref) < 1e-2


def quant_shared_inputs(H, I, S, bits, G, zp, dtype=torch.float32, device="cpu", seed=50):
    """A shared SwiGLU expert of width S * I, packed: (gate, up, down) and the float64 function it computes."""
    (gate, g64), (up, u64) = (quant_weight((S * I, H), bits, G, zp, dtype, device, seed + i) for i in range(2))
    down, d64 = quant_weight((H, S * I), bits, G, zp, dtype, device, seed + 2)

    def f64(x):
        x = x.double().cpu()
        return (F.silu(x @ g64.T) * (x @ u64.T)) @ d64.T
    return (gate, up, down), f64


@pytest.mark.parametrize("kind", list(QUANT_KINDS))
def test_fused_moe_quant_shared_reference(kind):
    bits, G, zp = QUANT_KINDS[kind]
    args, (gu64, dn64) = moe_quant_inputs(3, 8, 2, 256, 128, bits, G, zp)
    shared, f64 = quant_shared_inputs(256, 128, 2, bits, G, zp)
    want = moe_float64(args[0], gu64, dn64, args[3], args[4]) + f64(args[0])
    assert rel_err(fm.fused_moe_quant(*args, bits, shared=shared), want) < 1e-5


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs TRITON_INTERPRET=1 and triton, or CUDA")
@pytest.mark.parametrize("kind", list(QUANT_KINDS))
@pytest.mark.parametrize("T,S", [(1, 2), (3, 1)])
@pytest.mark.parametrize("loop", ["fma", "pipelined", "dot"])
def test_fused_moe_quant_gemv_runs_shared_expert(kind, T, S, loop):
    """The shared expert as S more pairs per token in the quantized GEMV kernels (and a skipped routed pair), the
    last pair of each token to finish summing them; on FMAs (register double buffer, or the loads pipelined through
    shared memory) and on the tensor cores (the token padded to 16 rows)."""
    bits, G, zp = QUANT_KINDS[kind]
    dev, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float16)
    args, (gu64, dn64) = moe_quant_inputs(T, 8, 3, 256, 128, bits, G, zp, dtype, dev, seed=T)
    shared, f64 = quant_shared_inputs(256, 128, S, bits, G, zp, dtype, dev)
    x, _, _, ids, w = args
    want = moe_float64(x.cpu(), gu64, dn64, ids.cpu(), w.cpu()) + f64(x)
    for _ in range(2):  # the arrival counters are zero again after a call
        cfg = {"fma": fm._qgemv(8, 128, 16, 128), "pipelined": fm._qgemv(8, 128, 16, 128, pipe=3),
               "dot": fm._qgemv(16, 128, 32, 128, dot=True, stages=2)}[loop]
        out = fm.fused_moe_quant_triton(*args, bits, cfg, shared=shared)
        assert out.shape == x.shape and rel_err(out.cpu(), want) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", list(QUANT_KINDS))
def test_fused_moe_quant_prefill_dequantizes_the_experts(kind, monkeypatch):
    """From DEQUANT_MIN_T tokens on, every expert is dequantized once and the bf16 kernels run: the same function as
    the quantized grouped GEMMs (a shared expert added, and a skipped pair)."""
    bits, G, zp = QUANT_KINDS[kind]
    T = 300
    args, (gu64, dn64) = moe_quant_inputs(T, 8, 3, 256, 128, bits, G, zp, torch.bfloat16, "cuda", seed=5)
    shared, f64 = quant_shared_inputs(256, 128, 2, bits, G, zp, torch.bfloat16, "cuda")
    x, _, _, ids, w = args
    want = moe_float64(x.cpu(), gu64, dn64, ids.cpu(), w.cpu()) + f64(x)
    monkeypatch.setitem(fm.DEQUANT_MIN_T, bits, T + 1)
    in_loop = fm.fused_moe_quant(*args, bits, shared=shared)
    monkeypatch.setitem(fm.DEQUANT_MIN_T, bits, T)
    dequant = fm.fused_moe_quant(*args, bits, shared=shared)
    assert rel_err(in_loop.cpu(), want) < 1e-2 and rel_err(dequant.cpu(), want) < 1e-2
    assert rel_err(dequant.float(), in_loop.float()) < 1e-2


@needs_interpreter
@pytest.mark.parametrize("M,cfg", [(3, None), (5, dict(f8.fp8_config(5), waves=50, MIN_STEPS=1)), (70, None)])
def test_fp8_block_linear_interpreter(M, cfg):
    w, s, w64 = fp8_weight(200, 384)
    x = exact_activations(M, 384).half()
    out = f8.fp8_block_linear_triton(x, w, s, (128, 128), cfg)
    # exact activations: only the fp32 accumulation and the fp16 output round
    assert rel_err(out, x.double() @ w64.T) < 2e-3
    q, qs = f8.act_quant_triton(x)
    rq, rs = f8.act_quant_ref(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(qs, rs)


@needs_interpreter
@pytest.mark.parametrize("layout", list(ATTN_LAYOUTS))
def test_fp8_kv_attention_interpreter(layout):
    Hq, Hkv, Dk, Dv, mla = ATTN_LAYOUTS[layout]
    q, k, v, bt, cl = paged_cache_inputs([1, 50, 0, 17], Hq, Hkv, Dk, Dv, 16, mla)
    k8 = to_kv(k, E4M3, 0.5)
    v8 = k8[..., :Dv] if mla else to_kv(v, E4M3, 0.5)
    ref = attn.paged_decode_attention_ref(q, k8, v8, bt, cl, 0.2, kv_scale=0.5)
    cfg = dict(BLOCK_N=16, BLOCK_H=16, waves=4, MIN_SPLIT=16, num_warps=4, num_stages=2)
    out = attn._paged_decode_triton(q.half(), k8, v8, bt, cl, 0.2, 64, cfg, 4, 0.5)
    assert (out[2] == 0).all()
    assert rel_err(out, ref) < 1e-2


# ------------------------------------------------------------------------------------------------ Triton: CUDA
CUDA_QUANT_SHAPES = [(576, 2048), (2048, 1408), (200, 384)]  # kv_a-like, down-like, odd


@needs_cuda
@pytest.mark.parametrize("kind", list(QUANT_KINDS))
@pytest.mark.parametrize("M", [1, 3, 8, 16, 33, 300])
@pytest.mark.parametrize("N,K", CUDA_QUANT_SHAPES)
def test_quant_linear_cuda(kind, M, N, K):
    bits, G, zp = QUANT_KINDS[kind]
    (q, s, z), _ = quant_weight((N, K), bits, G, zp, torch.bfloat16, "cuda", seed=M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    ref = quant_linear_ref(x.float(), q, s.float(), z, bits, b.float())
    out = quant_linear(x, q, s, z, bits, b)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    assert rel_err(out, ref) < 1e-2


@needs_cuda
@pytest.mark.parametrize("kind", list(QUANT_KINDS))
@pytest.mark.parametrize("config", ["gemv_nosplit", "gemv_split", "gemm16_split", "gemm64", "dequant"])
def test_quant_linear_cuda_configs(kind, config):
    cfg = {"gemv_nosplit": qg._gemv(8, 256, waves=0), "gemv_split": qg._gemv(32, 512, waves=64, min_steps=1),
           "gemm16_split": qg._gemm(16, 64, waves=64, min_steps=1), "gemm64": qg._gemm(64, 128, stages=3),
           "dequant": dict(path="dequant")}[config]
    for M in (1, 5, 40):
        for dtype in (torch.bfloat16, torch.float16):
            assert quant_case(kind, M, 576, 2048, dtype, cfg, seed=M, device="cuda") < 1e-2


@needs_cuda
def test_quant_linear_cuda_graph():
    (q, s, z), _ = quant_weight((1024, 2048), 4, 128, True, torch.bfloat16, "cuda")
    for M in (1, 8, 40):
        x = torch.randn(M, 2048, device="cuda", dtype=torch.bfloat16)
        quant_linear(x, q, s, z, 4)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = quant_linear(x, q, s, z, 4)
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert rel_err(out, quant_linear_ref(x.float(), q, s.float(), z, 4)) < 1e-2


MOE_QUANT_CONFIGS = {
    "default": None,
    "gemv_small_tiles": fm._qgemv(4, 256, 8, 128),
    "gemm_bm16": fm._qgemm(16, (64, 128, 1, 4, 4), (64, 128, 1, 4, 4)),
    "gemm_bm64": fm._qgemm(64, (128, 128, 8, 8, 3), (128, 64, 8, 4, 3)),
}


@needs_cuda
@pytest.mark.parametrize("kind", list(QUANT_KINDS))
@pytest.mark.parametrize("config", list(MOE_QUANT_CONFIGS))
@pytest.mark.parametrize("T,E,k,H,I", [(1, 64, 6, 512, 384), (8, 16, 4, 256, 128), (70, 10, 3, 384, 256)])
def test_fused_moe_quant_cuda(kind, config, T, E, k, H, I):
    bits, G, zp = QUANT_KINDS[kind]
    args, _ = moe_quant_inputs(T, E, k, H, I, bits, G, zp, torch.bfloat16, "cuda", seed=T)
    x, (gq, gs, gz), (dq, ds, dz), ids, w = args
    ref = fm.fused_moe_quant_ref(x.float(), (gq, gs.float(), gz), (dq, ds.float(), dz), ids, w, bits)
    out = fm.fused_moe_quant(*args, bits, config=MOE_QUANT_CONFIGS[config])
    assert out.dtype == torch.bfloat16 and out.shape == (T, H)
    assert rel_err(out, ref) < 1e-2


@needs_cuda
def test_fused_moe_quant_cuda_graph():
    for T in (2, 40):
        args, _ = moe_quant_inputs(T, 16, 4, 256, 128, 4, 64, False, torch.bfloat16, "cuda", seed=T)
        x, gu, dn, ids, w = args
        fm.fused_moe_quant(x, gu, dn, ids, w, 4)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fm.fused_moe_quant(x, gu, dn, ids, w, 4)
        (x2, _, _, ids2, w2), _ = moe_quant_inputs(T, 16, 4, 256, 128, 4, 64, False, torch.bfloat16, "cuda",
                                                   seed=T + 1)
        x.copy_(x2), ids.copy_(ids2), w.copy_(w2)
        graph.replay()
        ref = fm.fused_moe_quant_ref(x.float(), (gu[0], gu[1].float(), None), (dn[0], dn[1].float(), None), ids, w, 4)
        assert rel_err(out, ref) < 1e-2


@needs_fp8_cores
@pytest.mark.parametrize("M", [1, 16, 64, 300])
@pytest.mark.parametrize("N,K", [(576, 2048), (200, 384)])
def test_fp8_block_linear_cuda(M, N, K):
    w, s, _ = fp8_weight(N, K)
    w, s = w.cuda(), s.cuda()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out = f8.fp8_block_linear(x, w, s)
    assert out.dtype == torch.bfloat16 and out.shape == (M, N)
    # against the same math with act_quant's rounding: only accumulation order and the output rounding differ
    q, qs = f8.act_quant_ref(x)
    xq = q.float() * qs.repeat_interleave(128, 1)[:, :K]
    assert rel_err(out, f8.fp8_block_linear_ref(xq, w, s)) < 1e-2
    # against the unrounded activations: e4m3 keeps 3 mantissa bits (about 2.5% rms on a random dot product)
    assert rel_err(out, f8.fp8_block_linear_ref(x.float(), w, s)) < 5e-2


@needs_fp8_cores
def test_act_quant_cuda():
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16) * 3
    x[3, :128] = 0
    q, s = f8.act_quant(x)
    rq, rs = f8.act_quant_ref(x)
    assert torch.allclose(s, rs, rtol=1e-6, atol=0)
    # division may round differently by an ulp before the e4m3 rounding: allow rare one-step differences
    diff = (q.float() - rq.float()).abs()
    assert (diff > 0).float().mean() < 1e-3 and (diff <= rq.float().abs() / 8 + 1e-6).all()


@needs_cuda
@pytest.mark.parametrize("layout", ["v2_lite_mla", "qwen3_gqa"])
@pytest.mark.parametrize("lens", [[1], [1000], [77, 0, 300, 16, 5]])
def test_fp8_kv_attention_cuda(layout, lens):
    Hq, Hkv, Dk, Dv, mla = {"v2_lite_mla": (16, 1, 576, 512, True), "qwen3_gqa": (32, 4, 128, 128, False)}[layout]
    q, k, v, bt, cl = paged_cache_inputs(lens, Hq, Hkv, Dk, Dv, 16, mla)
    k8 = to_kv(k, E4M3, 0.5).cuda()
    v8 = k8[..., :Dv] if mla else to_kv(v, E4M3, 0.5).cuda()
    q, bt, cl = q.cuda().bfloat16(), bt.cuda(), cl.cuda()
    ref = attn.paged_decode_attention_ref(q.float(), k8, v8, bt, cl, 0.1, kv_scale=0.5)
    out = attn.paged_decode_attention(q, k8, v8, bt, cl, 0.1, kv_scale=0.5)
    assert out.dtype == torch.bfloat16
    assert all((out[b] == 0).all() for b, n in enumerate(lens) if n == 0)
    if any(lens):
        assert rel_err(out, ref) < 2e-2
