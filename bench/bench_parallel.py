"""Multi-GPU benchmark of the tensor-parallel engine: one random-weight checkpoint (DeepSeek-V2-Lite's shape by
default) served at 1 GPU, TP=2, EP=2 and data-parallel attention with EP=2 (dp2) (--configs) in one run, with
batch-1 and batch-256 greedy decode (--batches) and each configuration's greedy agreement with the first one. The
same run measures the ceilings: one card's copy bandwidth and matmul rate, and NCCL's all-reduce between the GPUs (a
decode row's hidden state inside a CUDA graph, as the engine issues it, and a large one's bus bandwidth); --hf adds
HF transformers with device_map="auto" on the same checkpoint. Prints JSON (and writes it to --out).

    PYTHONPATH=. python bench/bench_parallel.py --hf --out bench/results/parallel-v2lite-h200x2-DATE.json
    # a model that only fits across GPUs: random weights made on load (no checkpoint on disk), depth cut to 40
    PYTHONPATH=. python bench/bench_parallel.py --model qwen3-235b-a22b --layers 40 --dummy --configs tp2,ep2
    PYTHONPATH=. python bench/bench_parallel.py --smoke      # a tiny model on the CPU (gloo): the plumbing only
"""

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
# bench/ is on sys.path when this file runs as a script
from bench_engine import SHAPES, bench_hf, ceilings, decode_rates, make_checkpoint, random_prompts
from report import emit, save

from mixr.engine.distributed import NCCL_ENV

# name -> (GPUs, routed experts split by "tp" or "ep", attention "tp" or "dp", custom_all_reduce); each runs in a
# process of its own. dpN: data-parallel attention with expert-parallel experts (parallel_attention="dp").
CONFIGS = {f"{e}{n}{s}": (n, e, "tp", bool(s)) for n in (2, 4, 8) for e in ("tp", "ep") for s in ("", "-oneshot")}
CONFIGS |= {f"dp{n}": (n, "ep", "dp", False) for n in (2, 4, 8)}
CONFIGS["tp1"] = (1, "tp", "tp", False)


def _allreduce(rank: int, world_size: int, port: int, hidden: int, with_one_shot: bool, results) -> None:
    from mixr.kernels.timing import graph_ms
    from mixr.parallel import Comm

    def graph_us(fn) -> float:  # in a CUDA graph of 50 calls, as a decode step issues them
        return 1000 * graph_ms([fn] * 50)

    os.environ.update(NCCL_ENV)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            device_id=torch.device("cuda", rank))
    out = {}
    nccl, one_shot = Comm(rank, world_size), Comm(rank, world_size)
    why = one_shot.enable_one_shot(torch.device("cuda", rank), torch.bfloat16) if with_one_shot else "not asked for"
    out["one_shot_unavailable"] = why
    g = torch.Generator("cuda").manual_seed(rank)
    for rows in (1, 32, 256):
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
        out[f"nccl_allreduce_{rows}x{hidden}_bf16_us_in_cuda_graph"] = graph_us(lambda: nccl.all_reduce(x.clone()))
        if why is None and rows * hidden * 2 <= one_shot.one_shot.numel() * 2:
            a, b = nccl.all_reduce(x.clone()), one_shot.all_reduce(x.clone())
            out[f"one_shot_{rows}x{hidden}_max_abs_diff_vs_nccl"] = (a.float() - b.float()).abs().max().item()
            out[f"one_shot_allreduce_{rows}x{hidden}_bf16_us_in_cuda_graph"] = graph_us(
                lambda: one_shot.all_reduce(x.clone()))
    out["clone_only_us_in_cuda_graph"] = graph_us(lambda: x.clone())  # part of each figure above
    big = torch.randn(64 << 20, device="cuda", dtype=torch.bfloat16)  # 128 MiB
    for _ in range(3):
        dist.all_reduce(big)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        dist.all_reduce(big)
    torch.cuda.synchronize()
    # NCCL's bus bandwidth: what each GPU's links carry in a ring all-reduce, 2 (W - 1) / W of the buffer
    out["nccl_allreduce_bus_bandwidth_GBps"] = big.numel() * 2 * 20 * 2 * (world_size - 1) / world_size / (
        time.perf_counter() - t) / 1e9
    if rank == 0:
        results.put(out)
    dist.destroy_process_group()


def allreduce_ceilings(world_size: int, hidden: int, with_one_shot: bool) -> dict:
    """All-reduce between world_size GPUs, one process each, inside CUDA graphs: NCCL and the symmetric-memory
    one-shot kernel (mixr.parallel.Comm) for 1, 32 and 256 rows of the hidden state (a decode step does two per
    layer), their largest difference, and NCCL's bus bandwidth on 128 MiB."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_allreduce, (world_size, port, hidden, with_one_shot, results), nprocs=world_size,
                       start_method="spawn")
    return results.get()


def bench_config(path: Path, size: int, experts: str, attention: str, one_shot: bool, batches: list[int],
                 prompt_len: int, new: int, vocab: int, device: str, dtype: str, load_format: str = "safetensors"
                 ) -> tuple[dict, list[list[int]]]:
    from mixr import LLM, SamplingParams
    t = time.perf_counter()
    llm = LLM(path, device=device, dtype=dtype, max_model_len=4096, max_num_seqs=max(batches),
              max_num_batched_tokens=max(8192, max(batches)), tensor_parallel_size=size, parallel_experts=experts,
              parallel_attention=attention, load_format=load_format, custom_all_reduce=one_shot)
    comm = getattr(llm.model.lm_head, "comm", None)
    out = {"tensor_parallel_size": size, "experts": experts, "attention": attention,
           "cold_start_seconds": time.perf_counter() - t,
           "small_all_reduce": None if comm is None else "nccl" if comm.one_shot is None else "one-shot",
           "kv_blocks": llm.engine.runner.num_blocks, "graph_batch_sizes": sorted(llm.engine.runner.graphs),
           # tokens the engine can hold: under data-parallel attention each rank's cache holds its own sequences
           "kv_tokens_in_all": llm.engine.scheduler.block_manager.num_blocks * llm.engine.config.block_size}
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


def run_config(args, name: str, path: Path) -> tuple[dict, list[list[int]] | None]:
    """One configuration in a process of its own (this script with --run), so that one that crashes or leaves
    GPU memory behind does not take the others with it; its failure is recorded, not raised."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, __file__, "--run", name, "--run-out", str(out), "--dir", str(path),
               "--batches", args.batches, "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--model", args.model] + ["--dummy"] * args.dummy + ["--smoke"] * args.smoke
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.is_file():
            print(proc.stdout[-4000:], file=sys.stderr)
            return {"error": f"exit code {proc.returncode}", "output_tail": proc.stdout[-2000:]}, None
        run = json.loads(out.read_text())
    return run["result"], run["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(SHAPES), default="v2-lite")
    ap.add_argument("--layers", type=int, default=None, help="cut the depth (disk or memory limits)")
    ap.add_argument("--dir", default="/tmp/mixr-bench-parallel-ckpt")
    ap.add_argument("--configs", default="tp1,tp2,ep2,dp2", help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dummy", action="store_true",
                    help="no checkpoint on disk: random weights made on load (load_format='dummy')")
    ap.add_argument("--hf", action="store_true", help="also HF transformers, device_map='auto', batch 1")
    ap.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU, few tokens")
    ap.add_argument("--out", default=None)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one configuration, in a child process
    ap.add_argument("--run-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    path = Path(args.dir)
    device, dtype, prompt_len, new = "cuda", "bfloat16", args.prompt_len, args.new_tokens
    vocab = SHAPES[args.model]["vocab_size"]
    if args.smoke:
        torch.set_num_threads(1)
        device, dtype, batches, prompt_len, new = "cpu", "float32", [1, 4], 16, 8
    if args.run:
        if args.smoke:
            from mixr.tokenizer import Tokenizer
            vocab = Tokenizer.from_dir(path).vocab_size
        out, tokens = bench_config(path, *CONFIGS[args.run], batches, prompt_len, new, vocab, device, dtype,
                                   "dummy" if args.dummy else "safetensors")
        Path(args.run_out).write_text(json.dumps({"result": out, "tokens": tokens}))
        return
    shutil.rmtree(path, ignore_errors=True)
    names = args.configs.split(",")
    if args.smoke:
        from mixr.tiny import make_tiny_checkpoint
        make_tiny_checkpoint(path)
        result = {"device": "cpu (smoke)", "torch": torch.__version__, "model": "tiny-deepseek-v3"}
    else:
        result = {"device": f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
                  "torch": torch.__version__, "model": args.model, "date": time.strftime("%Y-%m-%d"),
                  "prompt_len": prompt_len, "new_tokens": new}
        result["checkpoint"] = make_checkpoint(args.model, args.layers, path, dummy=args.dummy)
        result["checkpoint"].pop("config")
        result["load_format"] = "dummy" if args.dummy else "safetensors"
        result["layers"] = args.layers or SHAPES[args.model]["num_hidden_layers"]
        result["ceilings"] = ceilings()
        W = max(CONFIGS[n][0] for n in names)
        if W > 1:
            result["ceilings"] |= allreduce_ceilings(W, SHAPES[args.model]["hidden_size"],
                                                     any(CONFIGS[n][3] for n in names))
        save(result, args.out)
    result["runs"] = {}
    first = None
    for name in names:
        out, tokens = run_config(args, name, path)
        if tokens is not None:
            first = first or tokens
            out["greedy_agreement_with_first"] = agreement(tokens, first)
        result["runs"][name] = out
        save(result, args.out)  # written after every configuration, so a run cut short loses nothing
    if args.hf and not args.smoke:
        result["hf_transformers_device_map_auto"] = bench_hf(path, vocab, prompt_len, new, [1], [], device_map="auto")
    emit(result, args.out)


if __name__ == "__main__":
    main()
