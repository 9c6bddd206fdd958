"""Multi-GPU benchmark of the tensor-parallel engine: one random-weight checkpoint (DeepSeek-V2-Lite's shape by
default) served at 1 GPU, TP=2 and EP=2 (--configs) in one run, with batch-1 and batch-256 greedy decode (--batches)
and each configuration's greedy agreement with the first one. Prints JSON (and writes it to --out).

    PYTHONPATH=. python bench/bench_parallel.py --out bench/results/parallel-v2lite-h200x2-DATE.json
    PYTHONPATH=. python bench/bench_parallel.py --smoke      # a tiny model on the CPU (gloo): the plumbing only
"""

import argparse
import gc
import shutil
import time
from pathlib import Path

import torch
# bench/ is on sys.path when this file runs as a script
from bench_engine import SHAPES, decode_rates, make_checkpoint, random_prompts
from report import emit, save

CONFIGS = {"tp1": (1, "tp"), "tp2": (2, "tp"), "ep2": (2, "ep"), "tp4": (4, "tp"), "ep4": (4, "ep"),
           "tp8": (8, "tp"), "ep8": (8, "ep")}


def bench_config(path: Path, size: int, experts: str, batches: list[int], prompt_len: int, new: int, vocab: int,
                 device: str, dtype: str) -> tuple[dict, list[list[int]]]:
    from mixr import LLM, SamplingParams
    t = time.perf_counter()
    llm = LLM(path, device=device, dtype=dtype, max_model_len=4096, max_num_seqs=max(batches),
              max_num_batched_tokens=max(8192, max(batches)), tensor_parallel_size=size, parallel_experts=experts)
    out = {"tensor_parallel_size": size, "experts": experts, "cold_start_seconds": time.perf_counter() - t,
           "kv_blocks": llm.engine.runner.num_blocks, "graph_batch_sizes": sorted(llm.engine.runner.graphs)}
    out |= decode_rates(llm, batches, prompt_len, new, vocab)
    tokens = [r.token_ids for r in llm.generate(random_prompts(8, 32, vocab, seed=5000),
                                                SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))]
    if device == "cuda":
        out["peak_gpu_memory_GiB_rank0"] = torch.cuda.max_memory_allocated() / 2 ** 30
    llm.close()
    del llm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out, tokens


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each sequence's greedy tokens that agree before the first difference."""
    def prefix(x, y):
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x)) / len(x)
    return sum(prefix(x, y) for x, y in zip(a, b)) / len(a)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(SHAPES), default="v2-lite")
    ap.add_argument("--layers", type=int, default=None, help="cut the depth (disk or memory limits)")
    ap.add_argument("--dir", default="/tmp/mixr-bench-parallel-ckpt")
    ap.add_argument("--configs", default="tp1,tp2,ep2", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU, few tokens")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    configs = [CONFIGS[c] for c in args.configs.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    path = Path(args.dir)
    shutil.rmtree(path, ignore_errors=True)
    if args.smoke:
        from mixr.tiny import make_tiny_checkpoint
        from mixr.tokenizer import Tokenizer
        torch.set_num_threads(1)
        make_tiny_checkpoint(path)
        vocab = Tokenizer.from_dir(path).vocab_size
        device, dtype, batches, prompt_len, new = "cpu", "float32", [1, 4], 16, 8
        result = {"device": "cpu (smoke)", "torch": torch.__version__, "model": "tiny-deepseek-v3"}
    else:
        device, dtype, prompt_len, new = "cuda", "bfloat16", args.prompt_len, args.new_tokens
        vocab = SHAPES[args.model]["vocab_size"]
        result = {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
                  "torch": torch.__version__, "model": args.model, "date": time.strftime("%Y-%m-%d"),
                  "prompt_len": prompt_len, "new_tokens": new}
        result["checkpoint"] = make_checkpoint(args.model, args.layers, path)
        result["checkpoint"].pop("config")
        result["layers"] = args.layers or SHAPES[args.model]["num_hidden_layers"]
    result["runs"] = {}
    first = None
    for size, experts in configs:
        name = f"{experts}{size}" if size > 1 else "tp1"
        out, tokens = bench_config(path, size, experts, batches, prompt_len, new, vocab, device, dtype)
        first = first or tokens
        out["greedy_agreement_with_first"] = agreement(tokens, first)
        result["runs"][name] = out
        save(result, args.out)  # written after every configuration, so a run cut short loses nothing
    emit(result, args.out)


if __name__ == "__main__":
    main()
