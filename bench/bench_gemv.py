"""Skinny GEMM (mixr.kernels.gemv) against cuBLAS on DeepSeek-V2-Lite's dense decode linears; prints JSON.

    PYTHONPATH=. python bench/bench_gemv.py [--out bench/results/gemv-h100.json] [--sweep] [--budget 55]

Shapes (N, K): q_proj 3072x2048, kv_a_proj_with_mqa 576x2048, o_proj 2048x2048, shared-expert gate/up 2816x2048
and down 2048x2816, the dense first layer's gate/up 10944x2048 and down 2048x10944, lm_head 102400x2048, at
M = 1, 2, 4, 8 rows (bf16); and the fused gate_up (silu(x Wg^T) * (x Wu^T)) for the shared experts and the dense
MLP against PyTorch's gate, up, silu, mul.

Timing as bench_kernels.py: each call is captured in a CUDA graph with the same call on other "layers" (separate
weights), so the bytes per replay exceed L2 as consecutive layers of a model do, and replayed between CUDA events.
GB/s = (weight + x + output bytes) / time; `copy_fraction` divides by a device-to-device copy measured in the same
run (read + write bytes / time). Every skinny result is checked against an fp32 reference first (rel_err).
--sweep also times a few other tile configs per shape and reports the best (slow: for tuning skinny_config).
"""

import argparse
import importlib
import math
import sys
import time

import torch
import torch.nn.functional as F
from bench_kernels import gpu_report, rel_err, time_graph
from report import emit

gemv = importlib.import_module("mixr.kernels.gemv")

DEV = "cuda"
L2_BYTES = 50e6
LINEAR = {"q_proj": (3072, 2048), "kv_a_proj_with_mqa": (576, 2048), "o_proj": (2048, 2048),
          "shared_gate_or_up": (2816, 2048), "shared_down": (2048, 2816), "dense_gate_or_up": (10944, 2048),
          "dense_down": (2048, 10944), "lm_head": (102400, 2048)}
GATE_UP = {"shared_gate_up": (2816, 2048), "dense_gate_up": (10944, 2048)}
ROWS = [1, 2, 4, 8]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def layers_for(nbytes: float) -> int:
    return max(2, min(64, math.ceil(3 * L2_BYTES / nbytes)))


def candidates(M: int, gate_up: bool) -> list[dict]:
    fma = [dict(DOT=False, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=None, waves=2, MIN_STEPS=1, splits=None)
           for bn, bk, w in ((4, 512, 4), (8, 256, 4), (8, 1024, 4), (16, 512, 4), (16, 512, 8), (4, 1024, 4))]
    dot = [dict(DOT=True, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, waves=2, MIN_STEPS=2, splits=None)
           for bn, bk, st in ((16, 128, 4), (16, 256, 3), (32, 256, 3), (64, 128, 4), (32, 64, 6))]
    return fma + dot[:2] if M <= 2 else dot + fma[:2]


def bench_one(kind: str, name: str, N: int, K: int, M: int, do_sweep: bool, ceil_bw: float, gen) -> dict:
    per_layer = N * K * 2 * (2 if kind == "gate_up" else 1)
    ws = [tuple((torch.randn(N, K, device=DEV, generator=gen) / K**0.5).bfloat16()
                for _ in range(2 if kind == "gate_up" else 1)) for _ in range(layers_for(per_layer))]
    x = torch.randn(M, K, device=DEV, generator=gen).bfloat16()
    w32 = [w.float() for w in ws[0]]
    if kind == "linear":
        ref = F.linear(x.float(), w32[0])
        torch_fn = lambda w: F.linear(x, *w)
    else:
        ref = F.silu(F.linear(x.float(), w32[0])) * F.linear(x.float(), w32[1])
        torch_fn = lambda w: gemv.skinny_gate_up_ref(x, *w)

    def skinny_fn(cfg):
        return lambda w: gemv._launch(x, w[0], w[1] if kind == "gate_up" else None, None, cfg)

    def measure(cfg):
        err = rel_err(skinny_fn(cfg)(ws[0]), ref)
        return err, time_graph([lambda w=w: skinny_fn(cfg)(w) for w in ws], min_ms=10, batches=5) * 1e3

    nbytes = per_layer + 2 * M * K + 2 * M * N
    torch_us = time_graph([lambda w=w: torch_fn(w) for w in ws], min_ms=10, batches=5) * 1e3
    cfg = gemv.skinny_config(M, N, K, gate_up=kind == "gate_up")
    err, us = measure(None)
    row = dict(kind=kind, name=name, N=N, K=K, M=M, torch_us=torch_us, skinny_us=us, rel_err=err,
               torch_GBps=nbytes / torch_us / 1e3, skinny_GBps=nbytes / us / 1e3,
               splits=gemv.split_plan(N, K, cfg, gemv.sm_count(x.device), kind == "gate_up")[0],
               config={k: v for k, v in cfg.items() if v is not None})
    row["skinny_copy_fraction"] = row["skinny_GBps"] * 1e9 / ceil_bw
    row["speedup"] = torch_us / us
    if do_sweep:
        tried = []
        for c in candidates(M, kind == "gate_up"):
            try:
                e, t = measure(c)
            except Exception as ex:  # a tile that does not fit, say
                e, t = float("nan"), float("nan")
                log(f"    config failed {c}: {type(ex).__name__}: {str(ex)[:120]}")
            tried.append(dict(config={k: v for k, v in c.items() if v is not None}, us=t, rel_err=e))
        ok = [t for t in tried if t["rel_err"] < 2e-2 and t["us"] == t["us"]]
        row["sweep_best"] = min(ok, key=lambda t: t["us"]) if ok else None
        row["sweep"] = tried
    log(f"{kind:7s} {name:19s} M={M}  torch {torch_us:7.2f} us {row['torch_GBps']:6.0f} GB/s   skinny {us:7.2f} us "
        f"{row['skinny_GBps']:6.0f} GB/s ({row['skinny_copy_fraction']:.2f} of copy)  x{row['speedup']:.2f}  "
        f"err {err:.1e}" + (f"  sweep best {row['sweep_best']['us']:.2f} us" if row.get("sweep_best") else ""))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true", help="also time other tile configs and report the best")
    ap.add_argument("--budget", type=float, default=55.0, help="seconds; shapes past it are skipped")
    args = ap.parse_args()
    deadline = time.time() + args.budget
    report = gpu_report()
    ceil_bw = report["copy_bandwidth_GBps"] * 1e9
    log(f"{report['device']}: copy {report['copy_bandwidth_GBps']:.0f} GB/s")
    gen = torch.Generator(device=DEV).manual_seed(0)
    report["results"], report["skipped"] = [], []
    items = [("linear", n, s) for n, s in LINEAR.items()] + [("gate_up", n, s) for n, s in GATE_UP.items()]
    with torch.inference_mode():
        for kind, name, (N, K) in items:
            for M in ROWS:
                if time.time() > deadline:
                    report["skipped"].append(f"{kind} {name} M={M}")
                    continue
                report["results"].append(bench_one(kind, name, N, K, M, args.sweep, ceil_bw, gen))
            torch.cuda.empty_cache()
    bad = [r for r in report["results"] if not r["rel_err"] < 2e-2]
    report["failing_checks"] = len(bad)
    emit(report, args.out, indent=1, default=str)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
