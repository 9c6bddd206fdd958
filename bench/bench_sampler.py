"""The batched sampler (mixr.sampling.sample_batch) against a per-row loop over the same filters; prints JSON.

    PYTHONPATH=. python bench/bench_sampler.py [--device cuda] [--out bench/results/sampler-h100.json]

Per (rows, vocab) and setting: ms per call of sample_batch, and of the per-row loop it replaced (each row:
filter_logits, softmax, an exponential race with the request's own torch.Generator, argmax: a few kernels per
row), both ending in one host sync. Shapes: the default model's vocabulary (~1k) at GRPO's batch sizes, and
DeepSeek-V2's 102,400 at serving batch sizes. Wall time per call, after warm-up, synchronized.
"""

import argparse
import random
import time

import torch
from report import emit

from mixr.sampling import SampleRequest, SamplingParams, filter_logits, sample_batch

SHAPES = [(64, 1024), (512, 1024), (32, 102400), (256, 102400)]
SETTINGS = {"temperature_1": SamplingParams(temperature=1.0),
            "temperature_0.7_top_p_0.9": SamplingParams(temperature=0.7, top_p=0.9)}


def per_row(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> list[int]:
    choice = logits.float().argmax(-1)
    for i, g in enumerate(generators):
        probs = filter_logits(logits[i].float(), params).softmax(-1)
        choice[i] = (probs / torch.empty_like(probs).exponential_(generator=g)).argmax()
    return choice.tolist()


def ms_per_call(fn, device: str, n: int = 20) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = args.device
    result = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": []}
    for B, V in SHAPES:
        logits = torch.randn(B, V, device=dev)
        for name, p in SETTINGS.items():
            reqs = [SampleRequest(p, random.Random(i), [], []) for i in range(B)]
            gens = [torch.Generator(device=dev).manual_seed(i) for i in range(B)]
            batched = ms_per_call(lambda: sample_batch(logits, reqs), dev)
            loop = ms_per_call(lambda: per_row(logits, p, gens), dev)
            result["results"].append({"rows": B, "vocab": V, "setting": name, "batched_ms": batched,
                                      "per_row_loop_ms": loop, "speedup": loop / batched})
    emit(result, args.out, indent=1)


if __name__ == "__main__":
    main()
