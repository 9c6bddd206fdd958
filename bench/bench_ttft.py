"""GPU: time to the first token of one prompt, 64 to 512 tokens, on the V2-Lite shape (random weights made on
load, load_format="dummy"): mixr as shipped (prompt chunks up to model_runner.DECODE_CHUNK tokens run as rows of
the captured decode graphs), mixr with that limit at --before (what it was; longer prompts take the eager prefill), and
HF transformers (`generate` with max_new_tokens=1, the same config, random weights). The card's ceilings come from
the same run. Prints JSON (and writes it to --out).

    PYTHONPATH=. python bench/bench_ttft.py --out bench/results/ttft-v2lite-h100-DATE.json
"""

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
from bench_engine import SHAPES, ceilings, make_checkpoint, random_prompts
from report import emit, save

import mixr.engine.model_runner as model_runner
from mixr import LLM, SamplingParams


def median_ms(fn, runs) -> float:
    fn(runs[0])  # warm-up
    times = []
    for x in runs[1:]:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def bench_mixr(path: Path, lengths: list[int], vocab: int, chunk: int) -> tuple[dict, dict]:
    model_runner.DECODE_CHUNK = chunk
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    t = time.perf_counter()
    llm = LLM(path, load_format="dummy", dtype="bfloat16", max_num_seqs=256, max_model_len=4096,
              enable_prefix_caching=False)
    out = {"decode_chunk": chunk, "start_seconds": time.perf_counter() - t,
           "graph_batch_sizes": sorted(llm.engine.runner.graphs)}
    firsts = {}
    for n in lengths:
        prompts = random_prompts(7, n, vocab, seed=n)
        out[f"ttft_ms_{n}"] = median_ms(lambda p: llm.generate([p], one), prompts)
        firsts[n] = [o.token_ids[0] for o in llm.generate(prompts, one)]
    llm.engine.runner.graphs.clear()
    return out, firsts  # the caller frees the memory (free_gpu)


def bench_hf(path: Path, lengths: list[int], vocab: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    t = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    out = {"build_seconds": time.perf_counter() - t}
    for n in lengths:
        prompts = random_prompts(7, n, vocab, seed=n)
        with torch.inference_mode():
            out[f"ttft_ms_{n}"] = median_ms(
                lambda p: model.generate(torch.tensor([p], device="cuda"), max_new_tokens=1, do_sample=False),
                prompts)
    return out


def free_gpu() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="64,128,200,256,384,512")
    ap.add_argument("--before", type=int, default=128, help="the DECODE_CHUNK to compare with")
    ap.add_argument("--dir", default="/tmp/mixr-bench-ttft")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    path = Path(args.dir)
    vocab = SHAPES["v2-lite"]["vocab_size"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": "v2-lite",
              "date": time.strftime("%Y-%m-%d"), "weights": "random (load_format='dummy'; HF: from_config)",
              "max_num_seqs": 256, "checkpoint": make_checkpoint("v2-lite", None, path, dummy=True),
              "ceilings": ceilings()}
    result["checkpoint"].pop("config", None)
    shipped = model_runner.DECODE_CHUNK
    result["mixr"], firsts = bench_mixr(path, lengths, vocab, shipped)
    free_gpu()
    save(result, args.out)
    result["mixr_before"], before = bench_mixr(path, lengths, vocab, args.before)
    free_gpu()
    model_runner.DECODE_CHUNK = shipped
    # the same greedy first token by both paths, up to bf16 near-ties of a random model
    result["first_token_agreement"] = {n: sum(a == b for a, b in zip(firsts[n], before[n])) / len(firsts[n])
                                       for n in lengths}
    save(result, args.out)
    if not args.no_hf:
        result["hf"] = bench_hf(path, lengths, vocab)
    emit(result, args.out)


if __name__ == "__main__":
    main()
