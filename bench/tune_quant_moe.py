"""GPU: tune the fused MoE's small-batch (GEMV) tiles, bf16 and quantized, at DeepSeek-V2-Lite's shape (64 experts top-6,
hidden 2048, expert width 1408, two shared slices run in the same kernels, as the engine runs them).

Coordinate descent per (format, T): the gate+up tile (UP_N, UP_K, warps) with the current down tile, then the
down tile (DOWN_N, DOWN_K, DOWN_WARPS); --warps limits the warp counts tried, --pipes the FMA loops' load pipeline
depths (PIPE; 1 is the register double buffer), --dot sweeps the tensor-core GEMVs (and their pipeline depth)
instead. Every candidate is checked against `fused_moe_ref` / `fused_moe_quant_ref` (+ the shared expert) before it
is timed; timing is bench_kernels.time_graph over 3 layers of separate weights (more bytes than L2 holds). Prints
JSON (and writes --out); the best tiles go into mixr.kernels.fused_moe.MOE_CONFIGS (bf16) and moe_quant_config.

    PYTHONPATH=. python bench/tune_quant_moe.py --out $OUT/tune_quant_moe.json
"""

import argparse
import importlib
import itertools
import json
import time

import torch
from bench_kernels import rel_err, routing, time_graph
from report import save

from mixr.quant.rtn import QuantSpec, quantize_rtn

fm = importlib.import_module("mixr.kernels.fused_moe")
E, K_TOP, H, I, S = 64, 6, 2048, 1408, 2
FORMATS = {"bf16": None, "int4_g64": QuantSpec(4, 64), "int4_g128": QuantSpec(4, 128), "int8": QuantSpec(8)}
UP = [(n, k, w) for n, k, w in itertools.product((4, 8, 16, 32), (128, 256, 512, 1024), (1, 2, 4, 8))]
DOWN = [(n, k, w) for n, k, w in itertools.product((4, 8, 16, 32, 64), (128, 256, 512), (1, 2, 4))]
# --dot: the GEMVs on the tensor cores (DOT), 16-row-padded, whose loads are pipelined over num_stages buffers
UP_DOT = [(n, k, w, st) for n, k, w, st in itertools.product((16, 32, 64), (128, 256), (4, 8), (3, 4, 5))]
DOWN_DOT = [(n, k, w) for n, k, w in itertools.product((16, 32, 64, 128), (128, 256), (4, 8))]


def f32(q: tuple) -> tuple:
    """Packed weights with float32 scales, for the float32 reference."""
    return tuple(t.float() if t is not None and t.is_floating_point() else t for t in q)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default="int4_g64,int8")
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--dot", action="store_true", help="sweep the tensor-core GEMVs (DOT) instead")
    ap.add_argument("--warps", default="1,2,4,8", help="warp counts the sweep tries")
    ap.add_argument("--pipes", default="1", help="FMA GEMV loop depths (PIPE: cp.async buffers) the sweep tries")
    ap.add_argument("--budget", type=float, default=500, help="seconds; stops sweeping past it")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t_end = time.perf_counter() + args.budget
    warps = {int(w) for w in args.warps.split(",")}
    pipes = [int(p) for p in args.pipes.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = {"device": torch.cuda.get_device_name(), "shape": dict(E=E, k=K_TOP, H=H, I=I, shared_slices=S), "runs": []}
    for name in args.formats.split(","):
        spec = FORMATS[name]
        layers = []
        for _ in range(3):
            gu = (torch.randn(E, 2 * I, H, device="cuda", generator=gen) / H ** 0.5).bfloat16()
            dn = (torch.randn(E, H, I, device="cuda", generator=gen) / I ** 0.5).bfloat16()
            sh = [(torch.randn(S * I, H, device="cuda", generator=gen) / H ** 0.5).bfloat16() for _ in range(2)]
            sd = (torch.randn(H, S * I, device="cuda", generator=gen) / I ** 0.5).bfloat16()
            if spec is None:
                layers.append((gu, dn, (*sh, sd)))
            else:
                layers.append((quantize_rtn(gu, spec), quantize_rtn(dn, spec),
                               tuple(quantize_rtn(w, spec) for w in (*sh, sd))))
        for T in map(int, args.tokens.split(",")):
            xs = [torch.randn(T, H, device="cuda", generator=gen).bfloat16() for _ in layers]
            routes = [routing(T, E, K_TOP, gen) for _ in layers]
            gq, dq, shq = layers[0]
            if spec is None:
                ref = (fm.fused_moe_ref(xs[0].float(), gq.float(), dq.float(), *routes[0])
                       + fm.shared_mlp_ref(xs[0].float(), tuple(w.float() for w in shq)))

                def run_moe(l, cfg):
                    return fm.fused_moe(xs[l], layers[l][0], layers[l][1], *routes[l], config=cfg, shared=layers[l][2])
            else:
                ref = (fm.fused_moe_quant_ref(xs[0].float(), f32(gq), f32(dq), *routes[0], spec.bits)
                       + fm.shared_mlp_quant(xs[0].float(), tuple(map(f32, shq)), spec.bits))

                def run_moe(l, cfg):
                    return fm.fused_moe_quant_triton(xs[l], layers[l][0], layers[l][1], *routes[l], spec.bits, cfg,
                                                     shared=layers[l][2])

            def measure(cfg):
                err = rel_err(run_moe(0, cfg), ref)
                if not err < 1e-2:
                    return float("nan"), err
                return time_graph([lambda l=l: run_moe(l, cfg) for l in range(len(layers))]) * 1e3, err

            cur = fm.moe_config(T, H, I) if spec is None else fm.moe_quant_config(T, H, I, spec.bits,
                                                                                 spec.group_size or 0)
            run = {"format": name, "T": T, "start": dict(cur), "tried": []}
            run["start_us"] = best_us = measure(cur)[0]
            up, down = UP, DOWN
            if args.dot and spec is not None:  # the best tensor-core tiles, whatever the shipped ones take
                cur, best_us, up, down = dict(cur, DOT=True), float("inf"), UP_DOT, DOWN_DOT
            elif spec is not None:  # each FMA tile at each loop depth
                if cur.get("DOT"):  # the best FMA tiles, whatever the shipped tensor-core ones take
                    cur, best_us = dict(cur, DOT=False), float("inf")
                up, down = ([(*c, p) for c in cands for p in pipes] for cands in (UP, DOWN))
            for stage, cands in (("up", up), ("down", down)):
                for c in cands:
                    if time.perf_counter() > t_end:
                        break
                    if c[2] not in warps:
                        continue
                    cfg = dict(cur, UP_N=c[0], UP_K=c[1], num_warps=c[2]) if stage == "up" else \
                        dict(cur, DOWN_N=c[0], DOWN_K=c[1], DOWN_WARPS=c[2])
                    if len(c) == 4:
                        cfg["num_stages" if cfg.get("DOT") else "PIPE"] = c[3]
                    g = spec.group_size if spec is not None and spec.bits == 4 else 1
                    if cfg["UP_K"] % g or cfg["DOWN_K"] % g:
                        continue
                    try:
                        us, err = measure(cfg)
                    except Exception as e:  # a tile that does not compile or fit
                        us, err = float("nan"), repr(e)[:100]
                    run["tried"].append(dict(config=cfg, us=us, rel_err=err))
                    if us == us and us < best_us:
                        best_us, cur = us, cfg
            if best_us == float("inf"):  # no candidate ran (--budget): the shipped tiles stand
                cur, best_us = run["start"], run["start_us"]
            run["best"], run["best_us"] = cur, best_us
            print(json.dumps({k: v for k, v in run.items() if k != "tried"}), flush=True)
            out["runs"].append(run)
            save(out, args.out, indent=1)


if __name__ == "__main__":
    main()
