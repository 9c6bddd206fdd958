"""GPU: time the one-kernel router (mixr.kernels.router) at batch 1 for each ROUTER_TILE candidate, on
DeepSeek-V2-Lite's (64 experts, hidden 2048, softmax greedy) and DeepSeek-V3's (256 experts, hidden 7168, noaux_tc)
shapes. Each candidate is first checked against the PyTorch routing, then timed as 50 calls inside one CUDA graph.
Prints JSON (and writes it to --out); copy the fastest tile into ROUTER_TILE.

    PYTHONPATH=. python bench/tune_router.py --out $OUT/router.json
"""

import argparse

import torch
from report import emit

from mixr.kernels import router as R
from mixr.kernels.timing import graph_ms
from mixr.layers.moe import Router, RouterOptions

SHAPES = {
    "v2-lite": (2048, dict(num_experts=64, top_k=6)),
    "v3": (7168, dict(num_experts=256, top_k=8, scoring_func="sigmoid", topk_method="noaux_tc", n_group=8,
                      topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, correction_bias=True)),
}


def time_us(fn, calls: int = 50, replays: int = 20) -> float:
    return graph_ms([fn] * calls, reps=replays, batches=1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    default = dict(R.ROUTER_TILE)
    result = {"device": torch.cuda.get_device_name(), "default": default, "us_per_call": {}}
    torch.manual_seed(0)
    for name, (H, kw) in SHAPES.items():
        r = Router(H, RouterOptions(**kw)).cuda()
        r.weight.data = (torch.randn(r.weight.shape, device="cuda") / H ** 0.5).bfloat16()
        if r.opts.correction_bias:
            r.e_score_correction_bias.normal_(std=0.1)
        x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        bias = getattr(r, "e_score_correction_bias", None)
        _, ids_ref, _ = R.route_ref(x, r.weight, bias, r.opts)
        for block_k in (512, 1024, 2048):
            for warps in (1, 2, 4, 8):
                R.ROUTER_TILE.update(BLOCK_K=block_k, num_warps=warps)
                with torch.no_grad():
                    _, ids, _ = r(x)
                    assert torch.equal(ids.sort(-1).values, ids_ref.sort(-1).values), (name, block_k, warps)
                    result["us_per_call"][f"{name}/BLOCK_K={block_k}/num_warps={warps}"] = time_us(lambda: r(x))
        R.ROUTER_TILE.update(default)
        with torch.no_grad():  # the PyTorch path, for scale
            result["us_per_call"][f"{name}/pytorch"] = time_us(lambda: R.route_ref(x, r.weight, bias, r.opts))
    emit(result, args.out)


if __name__ == "__main__":
    main()
