"""Check the quantized / FP8 kernels against their references, then time them against bf16 on one GPU; writes and
prints JSON.

    PYTHONPATH=. python bench/bench_quant_kernels.py --out bench/results/quant-kernels-h100.json [--budget 170]

Shapes (DeepSeek-V2-Lite): dense q_proj 3072x2048, o_proj 2048x2048, kv_a 576x2048, shared experts gate_up
5632x2048 and down 2048x2816 at M = 1, 8, 32, 256: F.linear (bf16) vs quant_linear int8 (per channel) and int4
(g128, symmetric); routed experts E=64, H=2048, I=1408, top-6 at T = 1, 8, 32, 256: fused_moe (bf16) vs
fused_moe_quant int8 / int4 g128; fp8_block_linear vs bf16 F.linear at M = 1, 64, 2048 (V2-Lite o_proj and two
DeepSeek-V3 shapes); paged decode attention over an e4m3 cache vs bf16 (V2-Lite MLA, Qwen3 GQA). --dense-shapes,
--dense-m and --kinds pick others: q_kv_a (3648x2048) is q_proj and kv_a as the engine runs them, one GEMV;
dense_gate_up / dense_down are layer 0's dense MLP (21888x2048, 2048x10944); int4_g64 is the group V2-Lite's int4
checkpoints get (that MLP is 10944 wide).

    --only dense --sweep --dense-shapes q_kv_a,o_proj,shared_down --dense-m 1,2 --kinds int8,int4_g64

Timing as bench_kernels.py: each call is captured in a CUDA graph with the same call on other "layers" (separate
weights), so the bytes per replay exceed L2, and replayed between CUDA events. GB/s = bytes that must be read
(weights as stored: packed codes + scales + zeros; selected experts; cached KV rows) plus activations, over time;
`copy_fraction` divides by a measured device-to-device copy (read + write bytes / time) in the same run.
Correctness comes first: every timed kernel's output is compared with its reference (rel_err, fp32 reference).
"""

import argparse
import importlib
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from bench_kernels import (
    gpu_report,
    make_cache,
    poison_allocator,
    rel_err,
    routing,
    time_graph,
)
from report import save

from mixr.kernels.attention import paged_decode_attention, paged_decode_attention_ref
from mixr.kernels.fp8 import act_quant_ref, fp8_block_linear, fp8_block_linear_ref
from mixr.kernels.fused_moe import fused_moe, fused_moe_quant, fused_moe_quant_ref
from mixr.kernels.quant_gemm import pack_int4, quant_linear, quant_linear_ref
from mixr.kv_cache import to_kv

qg = importlib.import_module("mixr.kernels.quant_gemm")
fm = importlib.import_module("mixr.kernels.fused_moe")
f8 = importlib.import_module("mixr.kernels.fp8")

DEV = "cuda"
L2_BYTES = 50e6
DENSE = {"q_proj": (3072, 2048), "o_proj": (2048, 2048), "kv_a": (576, 2048), "shared_gate_up": (5632, 2048),
         "shared_down": (2048, 2816), "q_kv_a": (3648, 2048),  # q_kv_a: q_proj and kv_a as one, as the engine runs them
         "dense_gate_up": (21888, 2048), "dense_down": (2048, 10944)}  # layer 0's dense MLP
DENSE_M = [1, 8, 32, 256]
MOE = dict(E=64, k=6, H=2048, I=1408)
FP8 = {"v2lite_o_proj": (2048, 2048), "v3_shared_down": (7168, 2048), "v3_q_b": (24576, 1536)}
FP8_M = [1, 64, 2048]
ATTN = {"v2-lite-mla": dict(Hq=16, Hkv=1, Dk=576, Dv=512, mla=True),
        "qwen3-gqa": dict(Hq=32, Hkv=4, Dk=128, Dv=128, mla=False)}
ATTN_SHAPES = [(1, 4096), (32, 1024), (128, 1024), (256, 2048)]
KINDS = {"int8": (8, None), "int4_g128": (4, 128), "int4_g64": (4, 64)}  # V2-Lite's own int4 group: 64
DEADLINE = [math.inf]


def log(*a):
    print(*a, flush=True)


def time_left() -> float:
    return DEADLINE[0] - time.time()


def quantized(N, K, bits, G, n_layers, gen):
    """n_layers random packed weights (N, K) (symmetric), bf16 scales sized like RTN's on a N(0, 1/K) weight."""
    out = []
    for _ in range(n_layers):
        if bits == 8:
            q = torch.randint(-128, 128, (N, K), device=DEV, dtype=torch.int8, generator=gen)
            s = torch.full((N, 1), 3 / 127 / K**0.5, device=DEV, dtype=torch.bfloat16)
        else:
            q = pack_int4(torch.randint(0, 16, (N, K), device=DEV, generator=gen))
            s = torch.full((N, K // G), 3 / 7 / K**0.5, device=DEV, dtype=torch.bfloat16)
        out.append((q, s, None))
    return out


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def layers_for(per_layer_bytes: float) -> int:
    return max(2, min(64, math.ceil(3 * L2_BYTES / per_layer_bytes)))


def record(results, row, ceil_bw):
    row["GBps"] = row["bytes"] / (row["us"] * 1e-6) / 1e9
    row["copy_fraction"] = row["GBps"] * 1e9 / ceil_bw
    results.append(row)
    log("  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                        if k not in ("config", "sweep")))


def sweep(measure, candidates, best_us):
    """Time candidate configs (correct ones only); returns [(config, us, err)]."""
    tried = []
    for cfg in candidates:
        if time_left() < 15:
            break
        try:
            err, us = measure(cfg)
        except Exception as ex:  # a tile that does not fit, say
            err, us = float("nan"), float("nan")
            log(f"    config failed {cfg}: {type(ex).__name__}: {str(ex)[:120]}")
        tried.append(dict(config=cfg, us=us, rel_err=err))
    return tried


# ---------------------------------------------------------------------------------------------------- dense
def dense_candidates(M):
    if M <= qg.GEMV_MAX_M:
        return [qg._gemv(bn, bk, w, waves, pipe=p) for bn, bk, w, waves, p in
                ((8, 512, 4, 8, 1), (16, 512, 4, 4, 1), (16, 1024, 4, 4, 1), (16, 1024, 8, 4, 1), (32, 512, 8, 4, 1),
                 (8, 1024, 4, 8, 1), (16, 1024, 4, 8, 1), (32, 1024, 8, 2, 1), (4, 1024, 4, 8, 1),
                 # the K loop's loads pipelined over PIPE cp.async buffers (smaller steps with more buffers were
                 # slower at V2-Lite's shapes)
                 (16, 1024, 8, 4, 2), (8, 1024, 4, 8, 2))] + [
            # the tensor-core tiles, which dequantize a weight tile once for all rows
            qg._gemm(16, bn, bk, 1, w, st, waves) for bn, bk, w, st, waves in
            ((64, 128, 4, 4, 2), (128, 128, 4, 4, 2), (32, 128, 4, 4, 4), (64, 256, 4, 3, 2), (32, 256, 4, 4, 4),
             (64, 128, 8, 4, 2))]
    return [dict(path="dequant")] + [
        qg._gemm(bm, bn, bk, gm, w, st, waves) for bm, bn, bk, gm, w, st, waves in
        ((16, 64, 128, 1, 4, 4, 2), (16, 128, 128, 1, 4, 4, 2), (16, 32, 128, 1, 4, 4, 4), (32, 64, 128, 1, 4, 3, 2),
         (16, 128, 128, 1, 8, 4, 2), (64, 128, 64, 8, 4, 4, 1), (128, 128, 128, 8, 8, 3, 1))
        if bm <= max(16, 2 * M)]


def bench_dense(results, ceil_bw, do_sweep, shapes, ms, kinds):
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name in shapes:
        N, K = DENSE[name]
        for M in ms:
            if time_left() < 20:
                log(f"dense {name} M={M}: skipped (time budget)")
                continue
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16, generator=gen)
            act_bytes = 2 * M * (K + N)
            n_bf = layers_for(N * K * 2)
            ws = [torch.randn(N, K, device=DEV, dtype=torch.bfloat16, generator=gen) / K**0.5 for _ in range(n_bf)]
            us = time_graph([lambda w=w: F.linear(x, w) for w in ws]) * 1e3
            base = dict(kernel="dense", shape=name, N=N, K=K, M=M)
            record(results, dict(base, kind="bf16", us=us, bytes=N * K * 2 + act_bytes), ceil_bw)
            bf16_us = us
            del ws
            for kind in kinds:
                bits, G = KINDS[kind]
                per = N * K * bits / 8
                qs = quantized(N, K, bits, G, layers_for(per), gen)
                ref = quant_linear_ref(x.float(), qs[0][0], qs[0][1].float(), None, bits)

                def measure(cfg):
                    poison_allocator()
                    err = rel_err(quant_linear(x, *qs[0], bits, config=cfg), ref)
                    if not err < 1e-2:
                        return err, float("nan")
                    return err, time_graph([lambda q=q: quant_linear(x, *q, bits, config=cfg) for q in qs]) * 1e3

                err, us = measure(None)
                row = dict(base, kind=kind, us=us, rel_err=err, bytes=nbytes(*qs[0]) + act_bytes,
                           speedup_vs_bf16=bf16_us / us, config=qg.quant_config(M, N, K, bits))
                if do_sweep:
                    row["sweep"] = sweep(measure, dense_candidates(M), us)
                    ok = [c for c in row["sweep"] if c["us"] == c["us"]]
                    if ok:
                        row["best"] = min(ok, key=lambda c: c["us"])
                record(results, row, ceil_bw)
                if do_sweep and row.get("best"):
                    log(f"    best {row['best']['us']:.1f} us {row['best']['config']}")
                del qs
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- MoE
def moe_candidates(T):
    if T <= 8:
        return [fm._qgemv(un, uk, dn, dk, w) for un, uk, dn, dk, w in
                ((8, 512, 16, 512, 4), (8, 512, 8, 512, 4), (4, 512, 8, 512, 4), (16, 512, 16, 512, 8),
                 (8, 1024, 16, 1024, 4), (4, 1024, 8, 1024, 4), (16, 256, 32, 256, 4), (8, 256, 16, 512, 4))]
    if T > 32:  # the row block too: BLOCK_M sets how often each weight tile is dequantized
        tiles = [(n, 128, g, w, 3) for n in (128, 256) for w in (4, 8) for g in (1, 8)]
        return [fm._qgemm(bm, t, t) for bm in (16, 32, 64) for t in tiles]
    tiles = [(n, 128, 1, w, st) for n in (32, 64, 128, 256) for w in (2, 4, 8) for st in (2, 3, 4)
             if n * w <= 1024]
    gemv = [fm._qgemv(un, uk, dn, dk, w) for un, uk, dn, dk, w in ((16, 512, 32, 256, 4), (16, 512, 64, 128, 4))]
    return gemv + [fm._qgemm(16, t, t) for t in tiles] + [fm._qgemm(16, (64, 128, 8, 4, 4), (128, 128, 8, 4, 3))]


def bench_moe(results, ceil_bw, do_sweep, tokens, kinds):
    E, k, H, I = MOE["E"], MOE["k"], MOE["H"], MOE["I"]
    gen = torch.Generator(device=DEV).manual_seed(1)
    n_layers = 3
    gu = [(torch.randn(E, 2 * I, H, device=DEV, generator=gen) / H**0.5).bfloat16() for _ in range(n_layers)]
    dn = [(torch.randn(E, H, I, device=DEV, generator=gen) / I**0.5).bfloat16() for _ in range(n_layers)]
    quant = {kind: [(quantized(E * 2 * I, H, bits, G, 1, gen)[0], quantized(E * H, I, bits, G, 1, gen)[0])
                    for _ in range(n_layers)] for kind in kinds for bits, G in [KINDS[kind]]}
    quant = {kind: [tuple(tuple(t.view(E, -1, t.shape[-1]) if t is not None else None for t in q) for q in layer)
                    for layer in layers] for kind, layers in quant.items()}
    for T in tokens:
        if time_left() < 20:
            log(f"moe T={T}: skipped (time budget)")
            continue
        xs = [torch.randn(T, H, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(n_layers)]
        routes = [routing(T, E, k, gen) for _ in range(n_layers)]
        distinct = statistics.mean(r[0].unique().numel() for r in routes)
        act_bytes = 2 * T * H * 2
        base = dict(kernel="moe", T=T, E=E, k=k, H=H, I=I, distinct_experts=distinct)
        ref32 = fm.fused_moe_ref(xs[0].float(), gu[0].float(), dn[0].float(), *routes[0])
        err = rel_err(fused_moe(xs[0], gu[0], dn[0], *routes[0]), ref32)
        us = time_graph([lambda l=l: fused_moe(xs[l], gu[l], dn[l], *routes[l]) for l in range(n_layers)]) * 1e3
        bf16_us = us
        record(results, dict(base, kind="bf16", us=us, rel_err=err, bytes=distinct * 3 * H * I * 2 + act_bytes),
               ceil_bw)
        for kind in kinds:
            bits, G = KINDS[kind]
            layers = quant[kind]
            (gq, gs, _), (dq, ds, _) = layers[0]
            ref = fused_moe_quant_ref(xs[0].float(), (gq, gs.float(), None), (dq, ds.float(), None), *routes[0], bits)

            def measure(cfg):
                poison_allocator()
                err = rel_err(fused_moe_quant(xs[0], *layers[0], *routes[0], bits, config=cfg), ref)
                if not err < 1e-2:
                    return err, float("nan")
                return err, time_graph([lambda l=l: fused_moe_quant(xs[l], *layers[l], *routes[l], bits, config=cfg)
                                        for l in range(n_layers)]) * 1e3

            err, us = measure(None)
            per_expert = (nbytes(gq, gs) + nbytes(dq, ds)) / E
            row = dict(base, kind=kind, us=us, rel_err=err, bytes=distinct * per_expert + act_bytes,
                       speedup_vs_bf16=bf16_us / us, config=fm.moe_quant_config(T, H, I, bits),
                       dequant_from_tokens=fm.DEQUANT_MIN_T[bits])
            if T >= 128:  # both prefill paths: the quantized grouped GEMMs, and all experts dequantized + bf16's
                shipped = fm.DEQUANT_MIN_T[bits]
                for path, threshold in (("in_loop", 1 << 40), ("dequant", 0)):
                    fm.DEQUANT_MIN_T[bits] = threshold
                    row[f"{path}_rel_err"], row[f"{path}_us"] = measure(None)
                fm.DEQUANT_MIN_T[bits] = shipped
            if do_sweep:
                row["sweep"] = sweep(measure, moe_candidates(T), us)
                ok = [c for c in row["sweep"] if c["us"] == c["us"]]
                if ok:
                    row["best"] = min(ok, key=lambda c: c["us"])
            record(results, row, ceil_bw)
            if do_sweep and row.get("best"):
                log(f"    best {row['best']['us']:.1f} us {row['best']['config']}")
        del xs, routes, ref32
    del gu, dn, quant
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- FP8 linear
def bench_fp8(results, ceil_bw):
    if torch.cuda.get_device_capability() < (8, 9):
        log("fp8: skipped (no FP8 tensor cores)")
        return
    gen = torch.Generator(device=DEV).manual_seed(2)
    for name, (N, K) in FP8.items():
        for M in FP8_M:
            if time_left() < 20:
                log(f"fp8 {name} M={M}: skipped (time budget)")
                continue
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16, generator=gen)
            flops = 2 * M * N * K
            base = dict(kernel="fp8_linear", shape=name, N=N, K=K, M=M)
            n_bf = layers_for(N * K * 2)
            ws = [torch.randn(N, K, device=DEV, dtype=torch.bfloat16, generator=gen) / K**0.5 for _ in range(n_bf)]
            us = time_graph([lambda w=w: F.linear(x, w) for w in ws]) * 1e3
            bf16_us = us
            row = dict(base, kind="bf16", us=us, bytes=N * K * 2 + 2 * M * (K + N))
            row["TFLOPs"] = flops / (us * 1e-6) / 1e12
            record(results, row, ceil_bw)
            del ws
            sn, sk = -(-N // 128), -(-K // 128)
            w8 = [((torch.randn(N, K, device=DEV, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
                   torch.rand(sn, sk, device=DEV, generator=gen) / (100 * K**0.5) + 1e-5)
                  for _ in range(layers_for(N * K))]
            q, qs = act_quant_ref(x)
            xq = (q.float().view(M, -1, 128) * qs[..., None]).view(M, -1)[:, :K]
            err_aq = rel_err(fp8_block_linear(x, *w8[0]), fp8_block_linear_ref(xq, *w8[0]))
            err = rel_err(fp8_block_linear(x, *w8[0]), fp8_block_linear_ref(x.float(), *w8[0]))
            us = time_graph([lambda w=w: fp8_block_linear(x, *w) for w in w8]) * 1e3
            row = dict(base, kind="fp8_block", us=us, rel_err=err, rel_err_vs_act_quantized_ref=err_aq,
                       bytes=N * K + sn * sk * 4 + 2 * M * (K + N), speedup_vs_bf16=bf16_us / us,
                       config=f8.fp8_config(M))
            row["TFLOPs"] = flops / (us * 1e-6) / 1e12
            record(results, row, ceil_bw)
            del w8
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------- FP8 KV attention
def bench_attention(results, ceil_bw):
    for name, spec in ATTN.items():
        Hkv, Dk, Dv, mla = spec["Hkv"], spec["Dk"], spec["Dv"], spec["mla"]
        scale = 192**-0.5 if mla else Dk**-0.5
        for B, ctx in ATTN_SHAPES:
            if time_left() < 20:
                log(f"attention {name} B={B} ctx={ctx}: skipped (time budget)")
                continue
            row_elems = Hkv * (Dk if mla else Dk + Dv)
            n_layers = max(1, min(64, math.ceil(3 * L2_BYTES / (B * ctx * row_elems))))
            q, layers, lens = make_cache(B, ctx, spec, 16, n_layers)
            base = dict(kernel="decode_attention", model=name, B=B, ctx=ctx)
            kc, vc, bt = layers[0]
            bf_ref = paged_decode_attention_ref(q.float(), kc.float(), kc.float()[..., :Dv] if mla else vc.float(),
                                                bt, lens, scale)
            err = rel_err(paged_decode_attention(q, kc, vc, bt, lens, scale), bf_ref)
            us = time_graph([lambda l=l: paged_decode_attention(q, *layers[l][:2], layers[l][2], lens, scale,
                                                                max_context_len=ctx) for l in range(n_layers)]) * 1e3
            bf16_us = us
            record(results, dict(base, kind="bf16", us=us, rel_err=err, bytes=B * ctx * row_elems * 2), ceil_bw)
            layers8 = []
            for kc, vc, bt in layers:
                k8 = to_kv(kc, torch.float8_e4m3fn)
                layers8.append((k8, k8[..., :Dv] if mla else to_kv(vc, torch.float8_e4m3fn), bt))
            del layers
            k8, v8, bt = layers8[0]
            ref = paged_decode_attention_ref(q.float(), k8, v8, bt, lens, scale)
            err = rel_err(paged_decode_attention(q, k8, v8, bt, lens, scale), ref)
            err_vs_bf16 = rel_err(paged_decode_attention(q, k8, v8, bt, lens, scale), bf_ref)
            us = time_graph([lambda l=l: paged_decode_attention(q, *layers8[l][:2], layers8[l][2], lens, scale,
                                                                max_context_len=ctx) for l in range(n_layers)]) * 1e3
            record(results, dict(base, kind="fp8_kv", us=us, rel_err=err, rel_err_vs_bf16_cache=err_vs_bf16,
                                 bytes=B * ctx * row_elems, speedup_vs_bf16=bf16_us / us), ceil_bw)
            del layers8, q
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=170, help="seconds; later items are skipped past it")
    ap.add_argument("--sweep", action="store_true", help="also time candidate tile configs")
    ap.add_argument("--only", default="", help="comma list of: dense, moe, fp8, attention")
    ap.add_argument("--moe-tokens", default="1,8,32,256", help="the MoE's token counts")
    ap.add_argument("--dense-shapes", default="q_proj,o_proj,kv_a,shared_gate_up,shared_down",
                    help=f"comma list of: {', '.join(DENSE)}")
    ap.add_argument("--dense-m", default=",".join(map(str, DENSE_M)), help="the dense layers' row counts")
    ap.add_argument("--kinds", default="int8,int4_g128",
                    help=f"dense and MoE formats, comma list of: {', '.join(KINDS)}")
    args = ap.parse_args()
    moe_tokens = [int(t) for t in args.moe_tokens.split(",")]
    DEADLINE[0] = time.time() + args.budget
    only = set(filter(None, args.only.split(",")))
    torch.manual_seed(0)
    report = gpu_report()
    ceil_bw = report["copy_bandwidth_GBps"] * 1e9
    log(f"{report['device']}: copy {report['copy_bandwidth_GBps']:.0f} GB/s")

    failed = False
    kinds = args.kinds.split(",")
    dense = (args.dense_shapes.split(","), [int(m) for m in args.dense_m.split(",")], kinds)
    for stage, fn in (("dense", lambda r: bench_dense(r, ceil_bw, args.sweep, *dense)),
                      ("moe", lambda r: bench_moe(r, ceil_bw, args.sweep, moe_tokens, kinds)),
                      ("fp8", lambda r: bench_fp8(r, ceil_bw)), ("attention", lambda r: bench_attention(r, ceil_bw))):
        if only and stage not in only:
            continue
        report[stage] = []
        log(f"== {stage}")
        try:
            fn(report[stage])
        except Exception as ex:  # keep going: one broken stage should not hide the others' numbers
            failed = True
            import traceback
            traceback.print_exc()
            report.setdefault("errors", []).append(f"{stage}: {type(ex).__name__}: {ex}")
        save(report, args.out, indent=1, default=str)
    # correctness: rel_err vs the fp32 reference of the same quantized math (fp8 linear: vs act-quantized ref)
    bad = []
    for stage in ("dense", "moe", "fp8", "attention"):
        for r in report.get(stage, []):
            e = r.get("rel_err_vs_act_quantized_ref", r.get("rel_err"))
            if e is not None and not e < 2e-2:
                bad.append(r)
    report["failing_checks"] = len(bad)
    save(report, args.out, indent=1, default=str)
    log(f"failing checks: {len(bad)}")
    for r in bad:
        log("  FAIL", {k: v for k, v in r.items() if k not in ("sweep", "config")})
    log("summary: speedup vs bf16 (us)")
    for stage in ("dense", "moe", "fp8", "attention"):
        for r in report.get(stage, []):
            if "speedup_vs_bf16" in r:
                key = r.get("shape") or r.get("model") or ""
                size = r.get("M", r.get("T", r.get("B")))
                log(f"  {stage:9s} {key:16s} {size!s:>5} {r['kind']:10s} {r['us']:8.1f} us  x{r['speedup_vs_bf16']:.2f}"
                    f"  {r['copy_fraction']:.2f} of copy bw")
    sys.exit(1 if failed or bad else 0)


if __name__ == "__main__":
    main()
