"""Check the Triton kernels against their references, then time them on one GPU; writes and prints JSON.

    PYTHONPATH=. python bench/bench_kernels.py --out bench/results/kernels-h100-2026-11-23.json [--sweep] [--budget 380]

Shapes: the routed experts of DeepSeek-V2-Lite (E=64, k=6, H=2048, I=1408) and Qwen3-30B-A3B (E=128, k=8, H=2048,
I=768) at T = 1, 8, 32, 256, 2048; paged decode attention for Qwen3-30B-A3B GQA (32 query / 4 kv heads of 128) and
absorbed MLA for V2-Lite (16 heads, Dk 576, Dv 512, V a view of K) at block size 16.

Timing: each measured call is captured in a CUDA graph together with the same call on other "layers" (separate
weights / caches), and the graph is replayed between CUDA events; per-call time = median over batches / calls. The
layers make the bytes touched per replay exceed the L2 cache, as consecutive layers of a model do. References can
not all be captured (fused_moe_ref syncs the host) and are timed eagerly. Bandwidth = bytes that must be read
(selected expert weights or the cached KV rows, plus activations) / time; the ceiling is a measured
device-to-device copy (bytes read + written / time).
"""

import argparse
import importlib
import itertools
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from report import save

from mixr.kernels.attention import paged_decode_attention, paged_decode_attention_ref
from mixr.kernels.fused_moe import fused_moe, fused_moe_ref
from mixr.kernels.timing import events_ms, graph_ms

# The package exports functions named like their modules, so fetch the modules themselves by name.
attn_mod = importlib.import_module("mixr.kernels.attention")
moe_mod = importlib.import_module("mixr.kernels.fused_moe")

MOE_MODELS = {"deepseek-v2-lite": dict(E=64, k=6, H=2048, I=1408), "qwen3-30b-a3b": dict(E=128, k=8, H=2048, I=768)}
MOE_T = [1, 8, 32, 256, 2048]
ATTN_MODELS = {"qwen3-30b-a3b-gqa": dict(Hq=32, Hkv=4, Dk=128, Dv=128, mla=False),
               "deepseek-v2-lite-mla": dict(Hq=16, Hkv=1, Dk=576, Dv=512, mla=True)}
ATTN_SHAPES = [(1, 512), (1, 4096), (8, 512), (8, 4096), (32, 512), (32, 4096), (128, 1024), (256, 512), (256, 4096)]
L2_BYTES = 50e6
DEV = "cuda"
DEADLINE = [math.inf]  # past it, nothing new starts
SWEEP_END = [math.inf]  # past it, the current shape's sweep stops (each shape gets a share of the stage's time)


def log(*a):
    print(*a, flush=True)


def time_left() -> float:
    return DEADLINE[0] - time.time()


def share_sweep(stage_end: float, parts_left: int):
    """Give the next shape's sweep an equal part of what is left of the stage's time."""
    SWEEP_END[0] = time.time() + max(0.0, min(stage_end, DEADLINE[0] - 20) - time.time()) / max(1, parts_left)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison_allocator():
    """Fill free cached memory with NaN so an output element the kernel forgets to write shows up."""
    free = torch.cuda.mem_get_info()[0]
    n = int(min(free * 0.5, 8e9) // 4)
    t = torch.full((n,), float("nan"), device=DEV)
    del t


def time_graph(calls, min_ms: float = 25.0, batches: int = 7) -> float:
    """Median milliseconds per call of `calls` (a list of zero-argument callables), replayed as one CUDA graph."""
    return graph_ms(calls, min_ms=min_ms, batches=batches)


def time_eager(fn, min_ms: float = 25.0, batches: int = 5) -> float:
    fn()
    return events_ms(fn, min_ms=min_ms, batches=batches, min_reps=1, max_reps=200)


def gpu_report() -> dict:
    """The head of every kernel bench's JSON: the card, the versions, the date and the card's ceilings."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return dict(device=props.name, sm_count=props.multi_processor_count, torch=torch.__version__,
                triton=triton.__version__, date=time.strftime("%Y-%m-%d")) | ceilings()


def ceilings() -> dict:
    src = torch.randn(1 << 29, device=DEV, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_eager(lambda: dst.copy_(src), min_ms=50)
    copy_bw = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    del src, dst
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = time_eager(lambda: a @ b, min_ms=50)
    return dict(copy_bandwidth_GBps=copy_bw / 1e9, bf16_matmul_TFLOPs=2 * 8192**3 / (ms * 1e-3) / 1e12)


# ---------------------------------------------------------------------------------------------------- MoE
def moe_layers(E, H, I, n_layers, dtype=torch.bfloat16):
    gu = [(torch.randn(E, 2 * I, H, device=DEV) / H**0.5).to(dtype) for _ in range(n_layers)]
    dn = [(torch.randn(E, H, I, device=DEV) / I**0.5).to(dtype) for _ in range(n_layers)]
    return gu, dn


def routing(T, E, k, gen=None):
    ids = torch.rand(T, E, device=DEV, generator=gen).argsort(-1)[:, :k].to(torch.int32)  # distinct experts
    w = torch.rand(T, k, device=DEV, generator=gen).softmax(-1)
    return ids, w


GEMV_UP = [(8, 256), (4, 256), (8, 128), (16, 128), (4, 512), (16, 256)]
GEMV_DOWN = [(16, 128, False), (8, 128, False), (32, 128, False), (16, 256, False), (8, 256, False), (16, 128, True)]
TILES_SMALL_M = [(64, 128, 1, 4, 4), (32, 128, 1, 4, 4), (64, 256, 1, 4, 3), (128, 128, 1, 4, 3)]
TILES_LARGE_M = [(128, 64, 8, 8, 4), (256, 64, 8, 8, 3), (128, 64, 16, 8, 4), (128, 64, 8, 8, 3)]


def sweep_moe(T: int, default: dict, measure) -> list[dict]:
    """T = 1: every pairing of the small-batch tiles. Otherwise a coordinate search: per path / BLOCK_M, vary one
    GEMM's tile at a time, keeping the best."""
    tried: dict[str, dict] = {}

    def attempt(cfg):
        key = json.dumps(cfg, sort_keys=True)
        if key not in tried:
            if time.time() > SWEEP_END[0]:
                return None
            try:
                e, ms = measure(cfg)
            except Exception as ex:  # e.g. a tile that needs more shared memory than there is
                e, ms = float("nan"), float("nan")
                log(f"  config failed: {cfg}: {type(ex).__name__}: {str(ex)[:160]}")
            tried[key] = dict(config=cfg, ms=ms, rel_err=e)
        return tried[key]

    def better(a, b):
        return b if b is not None and b["ms"] == b["ms"] and (a is None or not a["ms"] < b["ms"]) else a

    attempt(default)
    if T == 1:
        for (un, uk), (dn, dk, fuse) in itertools.product(GEMV_UP, GEMV_DOWN):
            attempt(moe_mod._gemv(un, uk, dn, dk, fuse))
    elif T <= 8:
        cur = attempt(moe_mod._gemv(8, 256, 16, 128, False))
        for un, uk in GEMV_UP:
            cur = better(cur, attempt({**cur["config"], "UP_N": un, "UP_K": uk})) if cur else None
        for dn, dk, fuse in GEMV_DOWN:
            cur = better(cur, attempt({**cur["config"], "DOWN_N": dn, "DOWN_K": dk, "FUSE_K": fuse})) if cur else None
    bms = [16] if T <= 32 else [32] if T <= 256 else [64, 128]
    keys = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    for bm in bms:
        tiles = TILES_SMALL_M if bm <= 32 else TILES_LARGE_M
        cur = attempt(moe_mod._gemm(bm, tiles[0], tiles[0]))
        for which in ("up", "down"):
            for t in tiles:
                if cur is None:
                    break
                cur = better(cur, attempt({**cur["config"], which: dict(zip(keys, t))}))
    return list(tried.values())


def bench_moe(name, spec, sweep, results, ceil_bw, stage_end=math.inf):
    E, k, H, I = spec["E"], spec["k"], spec["H"], spec["I"]
    layer_bytes = 3 * E * H * I * 2
    n_layers = 4
    gu, dn = moe_layers(E, H, I, n_layers)
    gu32, dn32 = gu[0].float(), dn[0].float()
    gen = torch.Generator(device=DEV).manual_seed(0)
    for i, T in enumerate(MOE_T):
        share_sweep(stage_end, len(MOE_T) - i)
        if time_left() < 20:
            log(f"moe {name} T={T}: skipped (time budget)")
            continue
        xs = [torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(n_layers)]
        routes = [routing(T, E, k, gen) for _ in range(n_layers)]
        ref32 = fused_moe_ref(xs[0].float(), gu32, dn32, *routes[0])
        distinct = statistics.mean(r[0].unique().numel() for r in routes)
        nbytes = distinct * 3 * H * I * 2 + 2 * T * H * 2
        flops = 2 * T * k * 3 * H * I

        def run(cfg, l):
            return fused_moe(xs[l], gu[l], dn[l], *routes[l], config=cfg)

        def measure(cfg):
            poison_allocator()
            err = rel_err(run(cfg, 0), ref32)
            if not err < 2e-2:
                return err, float("nan")
            return err, time_graph([lambda l=l: run(cfg, l) for l in range(n_layers)])

        default = moe_mod.moe_config(T, H, I)
        err, ms = measure(default)
        row = dict(kernel="fused_moe", model=name, T=T, E=E, k=k, H=H, I=I, config=default, rel_err=err, ms=ms,
                   distinct_experts=distinct, bytes=nbytes, GBps=nbytes / (ms * 1e-3) / 1e9,
                   TFLOPs=flops / (ms * 1e-3) / 1e12, roofline_fraction=nbytes / (ms * 1e-3) / ceil_bw)
        # Reference: bf16 loop over experts (host sync, eager), and its error against the fp32 reference.
        ref_out = fused_moe_ref(xs[0], gu[0], dn[0], *routes[0])
        row["ref_rel_err"] = rel_err(ref_out, ref32)
        row["ref_ms"] = time_eager(lambda: fused_moe_ref(xs[1], gu[1], dn[1], *routes[1]), min_ms=20, batches=3)
        if sweep:
            tried = sweep_moe(T, default, measure)
            ok = [c for c in tried if c["ms"] == c["ms"]]
            row["sweep"] = tried
            row["best"] = min(ok, key=lambda c: c["ms"]) if ok else None
        results.append(row)
        best_ms = (row.get("best") or {}).get("ms", ms)
        log(f"moe {name:17s} T={T:5d} {ms * 1e3:9.1f} us  {row['GBps']:7.0f} GB/s ({row['roofline_fraction']:.2f} of copy)"
            f"  {row['TFLOPs']:6.1f} TFLOP/s  err {err:.1e}  ref {row['ref_ms'] * 1e3:9.1f} us"
            + (f"  best {best_ms * 1e3:.1f} us {(row.get('best') or {}).get('config')}" if sweep else ""))
        del xs, routes, ref32
    del gu, dn, gu32, dn32
    torch.cuda.empty_cache()


def check_moe_graph(results):
    """Capture fused_moe in a CUDA graph, then replay it on new inputs copied into the captured buffers."""
    E, k, H, I = 16, 4, 256, 128
    gu, dn = moe_layers(E, H, I, 1)
    for T in (1, 8, 100):
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
        ids, w = routing(T, E, k)
        fused_moe(x, gu[0], dn[0], ids, w)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fused_moe(x, gu[0], dn[0], ids, w)
        x.copy_(torch.randn_like(x))
        ids2, w2 = routing(T, E, k)
        ids.copy_(ids2)
        w.copy_(w2)
        g.replay()
        err = rel_err(out, fused_moe_ref(x.float(), gu[0].float(), dn[0].float(), ids, w))
        results.append(dict(check="fused_moe_cuda_graph", T=T, rel_err=err))
        log(f"check fused_moe graph replay T={T}: err {err:.1e}")


def check_moe_misc(results):
    """fp16, both small-batch variants and the grouped path at the same T, and odd sizes."""
    for dtype, E, k, H, I, T in ((torch.float16, 8, 2, 256, 96, 5), (torch.bfloat16, 64, 6, 2048, 1408, 8),
                                 (torch.bfloat16, 10, 3, 320, 200, 37), (torch.float16, 128, 8, 2048, 768, 300)):
        gu, dn = moe_layers(E, H, I, 1, dtype)
        x = torch.randn(T, H, device=DEV, dtype=dtype)
        ids, w = routing(T, E, k)
        ref32 = fused_moe_ref(x.float(), gu[0].float(), dn[0].float(), ids.long(), w)
        for cfg in (moe_mod._gemv(16, 256, 16, 128, True), moe_mod._gemv(8, 128, 16, 256, False),
                    moe_mod._gemm(16, (64, 128, 1, 4, 4), (64, 128, 1, 4, 4)),
                    moe_mod._gemm(64, (128, 64, 8, 4, 4), (64, 64, 8, 4, 4)), None):
            poison_allocator()
            err = rel_err(fused_moe(x, gu[0], dn[0], ids.long(), w, config=cfg), ref32)
            results.append(dict(check="fused_moe", dtype=str(dtype), E=E, k=k, H=H, I=I, T=T,
                                config=cfg or "default", rel_err=err))
            log(f"check fused_moe {dtype} E={E} k={k} H={H} I={I} T={T} {(cfg or {}).get('path', 'default')}"
                f" {(cfg or {}).get('BLOCK_M', '')}: err {err:.1e}")


# ---------------------------------------------------------------------------------------------------- attention
def make_cache(B, ctx, spec, bs, n_layers, lens=None, dtype=torch.bfloat16):
    Hkv, Dk, Dv = spec["Hkv"], spec["Dk"], spec["Dv"]
    max_blocks = triton_cdiv(ctx, bs)
    nblk = B * max_blocks + 1
    layers = []
    for _ in range(n_layers):
        kc = torch.randn(nblk, bs, Hkv, Dk, device=DEV, dtype=dtype)
        vc = kc[..., :Dv] if spec["mla"] else torch.randn(nblk, bs, Hkv, Dv, device=DEV, dtype=dtype)
        bt = torch.randperm(nblk - 1, device=DEV)[:B * max_blocks].view(B, max_blocks).to(torch.int32)
        layers.append((kc, vc, bt))
    if lens is None:
        lens = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(B, spec["Hq"], Dk, device=DEV, dtype=dtype)
    return q, layers, lens


def triton_cdiv(a, b):
    return -(-a // b)


def sdpa_gather(q, kc, vc, bt, lens, scale):
    """The reference the kernel replaces: gather the paged cache into (B, Hkv, S, D), then torch SDPA with a mask."""
    bs = kc.shape[1]
    pos = torch.arange(bt.shape[1] * bs, device=q.device)
    pages = bt[:, pos // bs].long()
    k = kc[pages, pos % bs].transpose(1, 2)  # (B, Hkv, S, Dk)
    v = vc[pages, pos % bs].transpose(1, 2)
    mask = (pos[None, :] < lens[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)[:, :, 0]


def attn_candidates(mla: bool, B: int, default: dict) -> list[dict]:
    tiles = ((32, 4), (32, 8), (64, 8), (16, 4), (64, 4)) if mla else ((64, 4), (32, 4), (128, 4), (128, 8), (64, 8))
    out = [dict(default, BLOCK_N=bn, num_warps=w) for bn, w in tiles]
    out += [dict(default, waves=2), dict(default, waves=8), dict(default, MIN_SPLIT=128), dict(default, MIN_SPLIT=32),
            dict(default, waves=2, MIN_SPLIT=128), dict(default, num_stages=3)]
    return out


def bench_attention(name, spec, sweep, results, ceil_bw, stage_end=math.inf):
    Hq, Hkv, Dk, Dv = spec["Hq"], spec["Hkv"], spec["Dk"], spec["Dv"]
    scale = Dk**-0.5 if not spec["mla"] else 192**-0.5
    default = attn_mod.ATTN_CONFIGS["mla" if spec["mla"] else "gqa"]
    for i, (B, ctx) in enumerate(ATTN_SHAPES):
        share_sweep(stage_end, len(ATTN_SHAPES) - i)
        if time_left() < 20:
            log(f"attention {name} B={B} ctx={ctx}: skipped (time budget)")
            continue
        bs = 16
        row_bytes = Hkv * (Dk if spec["mla"] else Dk + Dv) * 2
        per_layer = B * ctx * row_bytes
        n_layers = max(1, min(64, math.ceil(4 * L2_BYTES / per_layer)))
        q, layers, lens = make_cache(B, ctx, spec, bs, n_layers)
        nbytes = per_layer + 2 * B * Hq * (Dk + Dv)
        flops = 2 * B * Hq * ctx * (Dk + Dv)
        kc, vc, bt = layers[0]
        ref32 = paged_decode_attention_ref(q.float(), kc.float(), vc.float() if not spec["mla"] else kc.float()[..., :Dv],
                                           bt, lens, scale)

        def run(cfg, l):
            kc, vc, bt = layers[l]
            return paged_decode_attention(q, kc, vc, bt, lens, scale, max_context_len=ctx, config=cfg)

        def measure(cfg):
            poison_allocator()
            err = rel_err(run(cfg, 0), ref32)
            if not err < 2e-2:
                return err, float("nan")
            return err, time_graph([lambda l=l: run(cfg, l) for l in range(n_layers)])

        err, ms = measure(default)
        row = dict(kernel="paged_decode_attention", model=name, B=B, ctx=ctx, block_size=bs, config=default,
                   rel_err=err, ms=ms, bytes=nbytes, GBps=nbytes / (ms * 1e-3) / 1e9, TFLOPs=flops / (ms * 1e-3) / 1e12,
                   roofline_fraction=nbytes / (ms * 1e-3) / ceil_bw)
        try:
            row["sdpa_gather_rel_err"] = rel_err(sdpa_gather(q, kc, vc, bt, lens, scale), ref32)
            row["sdpa_gather_ms"] = time_graph([lambda l=l: sdpa_gather(q, *layers[l], lens, scale)
                                                for l in range(n_layers)])
        except Exception as ex:  # SDPA may reject a head-dim pair or run out of memory for the gathered copy
            row["sdpa_gather_error"] = f"{type(ex).__name__}: {str(ex)[:200]}"
        if sweep:
            tried = [dict(config=default, ms=ms, rel_err=err)]
            for cfg in attn_candidates(spec["mla"], B, default):
                if time.time() > SWEEP_END[0]:
                    break
                if cfg == default:
                    continue
                try:
                    e, t = measure(cfg)
                except Exception as ex:
                    e, t = float("nan"), float("nan")
                    log(f"  config failed: {cfg}: {type(ex).__name__}: {str(ex)[:200]}")
                tried.append(dict(config=cfg, ms=t, rel_err=e))
            ok = [c for c in tried if c["ms"] == c["ms"]]
            row["sweep"] = tried
            row["best"] = min(ok, key=lambda c: c["ms"]) if ok else None
        results.append(row)
        sd = row.get("sdpa_gather_ms")
        log(f"attn {name:20s} B={B:3d} ctx={ctx:4d} {ms * 1e3:8.1f} us {row['GBps']:6.0f} GB/s "
            f"({row['roofline_fraction']:.2f})  err {err:.1e}  sdpa-gather "
            + (f"{sd * 1e3:8.1f} us" if sd else "n/a")
            + (f"  best {row['best']['ms'] * 1e3:.1f} us {row['best']['config']}" if sweep and row.get('best') else ""))
        del q, layers, ref32, kc, vc, bt
        torch.cuda.empty_cache()


def check_attention(results):
    """Random lengths (not multiples of the block size, an empty one), block sizes 16/32/64, fp16, one split and
    many, a graph replay on new lengths."""
    cases = []
    for spec in ATTN_MODELS.values():
        for bs in (16, 32, 64):
            for B, ctx in ((1, 1000), (5, 300), (33, 77)):
                cases.append((spec, bs, B, ctx, torch.bfloat16))
        cases.append((spec, 16, 4, 50, torch.float16))
    for spec, bs, B, ctx, dtype in cases:
        lens = torch.randint(1, ctx + 1, (B,), device=DEV, dtype=torch.int32)
        lens[0] = ctx
        if B > 2:
            lens[1] = 0
        q, layers, _ = make_cache(B, ctx, spec, bs, 1, lens, dtype)
        kc, vc, bt = layers[0]
        ref32 = paged_decode_attention_ref(q.float(), kc.float(), kc.float()[..., :spec["Dv"]] if spec["mla"]
                                           else vc.float(), bt, lens, 0.1)
        for cfg in (None, dict(BLOCK_N=16, BLOCK_H=16, waves=8, MIN_SPLIT=16, num_warps=4, num_stages=2),
                    dict(BLOCK_N=64, BLOCK_H=16, waves=0, MIN_SPLIT=64, num_warps=8, num_stages=2)):
            poison_allocator()
            out = paged_decode_attention(q, kc, vc, bt, lens, 0.1, config=cfg)
            err = rel_err(out, ref32)
            zero_ok = bool((out[1] == 0).all()) if B > 2 else True
            results.append(dict(check="paged_decode_attention", Hq=spec["Hq"], Hkv=spec["Hkv"], Dk=spec["Dk"],
                                Dv=spec["Dv"], mla=spec["mla"], block_size=bs, B=B, ctx=ctx, dtype=str(dtype),
                                config=cfg or "default", rel_err=err, empty_context_zero=zero_ok))
            log(f"check attention Hq={spec['Hq']} Hkv={spec['Hkv']} Dk={spec['Dk']} bs={bs} B={B} ctx={ctx} {dtype} "
                f"cfg={'default' if cfg is None else cfg['BLOCK_N']}: err {err:.1e} empty->0 {zero_ok}")
    # CUDA graph: capture once, replay with new lengths, block tables and queries.
    spec = ATTN_MODELS["deepseek-v2-lite-mla"]
    B, ctx = 6, 200
    lens = torch.full((B,), ctx, device=DEV, dtype=torch.int32)
    q, layers, _ = make_cache(B, ctx, spec, 16, 1, lens)
    kc, vc, bt = layers[0]
    paged_decode_attention(q, kc, vc, bt, lens, 0.1)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = paged_decode_attention(q, kc, vc, bt, lens, 0.1)
    lens.copy_(torch.randint(1, ctx + 1, (B,), device=DEV, dtype=torch.int32))
    bt.copy_(bt[torch.randperm(B, device=DEV)])
    q.copy_(torch.randn_like(q))
    g.replay()
    err = rel_err(out, paged_decode_attention_ref(q.float(), kc.float(), kc.float()[..., :spec["Dv"]], bt, lens, 0.1))
    results.append(dict(check="paged_decode_attention_cuda_graph", rel_err=err))
    log(f"check attention graph replay: err {err:.1e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true", help="also time candidate tile configs and report the best")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds; later items are skipped past it")
    ap.add_argument("--only", default="", help="comma list of: checks, moe, attention")
    args = ap.parse_args()
    DEADLINE[0] = time.time() + args.budget
    only = set(filter(None, args.only.split(",")))
    torch.manual_seed(0)
    report = gpu_report()
    log(f"{report['device']}: copy {report['copy_bandwidth_GBps']:.0f} GB/s, bf16 matmul {report['bf16_matmul_TFLOPs']:.0f}"
        f" TFLOP/s")
    ceil_bw = report["copy_bandwidth_GBps"] * 1e9
    report["checks"], report["moe"], report["attention"] = [], [], []

    # (weight, stage): what is left of the budget after the checks is shared among the timed stages by weight.
    stages = []
    if not only or "checks" in only:
        stages += [(0, lambda end: check_moe_misc(report["checks"])), (0, lambda end: check_moe_graph(report["checks"])),
                   (0, lambda end: check_attention(report["checks"]))]
    if not only or "moe" in only:
        stages += [(1.3, lambda end, n=n, s=s: bench_moe(n, s, args.sweep, report["moe"], ceil_bw, end))
                   for n, s in MOE_MODELS.items()]
    if not only or "attention" in only:
        stages += [(1.0, lambda end, n=n, s=s: bench_attention(n, s, args.sweep, report["attention"], ceil_bw, end))
                   for n, s in ATTN_MODELS.items()]
    failed = False
    for i, (weight, stage) in enumerate(stages):
        later = sum(w for w, _ in stages[i:])
        end = time.time() + (DEADLINE[0] - time.time()) * weight / later if later else DEADLINE[0]
        try:
            stage(end)
        except Exception as ex:  # keep going: one broken stage should not hide the others' numbers
            failed = True
            import traceback
            traceback.print_exc()
            report.setdefault("errors", []).append(f"{type(ex).__name__}: {ex}")
        save(report, args.out, indent=1, default=str)
    bad = [c for c in report["checks"] if not c["rel_err"] < 2e-2 or not c.get("empty_context_zero", True)]
    log(f"checks: {len(report['checks'])}, failing: {len(bad)}")
    for c in bad:
        log("  FAIL", c)
    log("summary (us, fraction of copy bandwidth):")
    for r in report["moe"]:
        log(f"  moe  {r['model']:17s} T={r['T']:5d} {r['ms'] * 1e3:8.1f} ({r['roofline_fraction']:.2f})  ref "
            f"{r['ref_ms'] * 1e3:8.1f}")
    for r in report["attention"]:
        log(f"  attn {r['model']:20s} B={r['B']:3d} ctx={r['ctx']:4d} {r['ms'] * 1e3:8.1f} ({r['roofline_fraction']:.2f})"
            f"  sdpa-gather {r.get('sdpa_gather_ms', float('nan')) * 1e3:8.1f}")
    sys.exit(1 if failed or bad else 0)


if __name__ == "__main__":
    main()
