"""GPU benchmark of CPU+GPU hybrid experts (mixr.offload) on the random DeepSeek-V2-Lite shape.

V2-Lite's routed experts take 26 layers x 64 x 17.3 MB = 28.8 GB in bf16; a 4 GB expert budget keeps 8 of each
layer's 64 on the GPU. One run, one card, one checkpoint (bench_engine's random V2-Lite):
  all_gpu   the engine as usual (every weight on the GPU, CUDA graphs)
  hybrid    LLM(expert_offload="cpu", gpu_expert_budget_gb=4): misses computed on the CPU or copied in expert by
            expert (decode), or, at >= bulk_min_tokens tokens (prefill), every non-resident expert copied in a
            few large copies on a side stream, the next layer's copy overlapping this layer's compute; eager
  naive     the same host copies, but every MoE layer copies all 64 of its experts to one GPU buffer when it
            runs, on the compute stream (accelerate-style layer-by-layer offload, from pinned memory); eager
Correctness first: float32 on a 3-layer cut of the shape (greedy tokens of hybrid and naive identical to
all-on-GPU), then bf16 at full depth: teacher-forced top-1 agreement and logit error against all-on-GPU.
bf16 results differ from all-on-GPU by rounding alone; the noise floor is the same comparison between the Triton
kernels and the plain-PyTorch reference on identical GPU weights.
Then batch-1 decode tok/s and prefill tok/s (512, 2048 and 8192 tokens: one chunk each, so a copied expert
serves the whole chunk), the hybrid's cache statistics and which path each measurement took (`*_path`: bulk,
per_expert or mixed), the prefills again with the bulk path off (`no_bulk`: the per-expert path, as before it
existed), and the per-expert path's miss policies side by side (bulk off): balanced (the default: misses split
between CPU compute and copies by measured cost), copy_only (no CPU compute) and cpu_first (every miss with at
most 8 tokens on the CPU).

    PYTHONPATH=. python bench/bench_offload.py --out results.json          # ~4 min on one H100
    PYTHONPATH=. python bench/bench_offload.py --smoke                     # tiny shape, any device: does it run
"""

import argparse
import gc
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from bench_engine import SHAPES, cover_vocab, make_checkpoint, random_prompts
from report import emit, save

from mixr import LLM, SamplingParams, load_model
from mixr.checkpoint import save_model
from mixr.kernels import fused_moe, fused_moe_ref
from mixr.models import config_from_hf
from mixr.offload import OffloadedExperts, load_offloaded, offload_stats
from mixr.reference import reference_generate
from mixr.tiny_tokenizer import build_tokenizer

VOCAB = 102400
DEV = "cuda"  # --smoke on a machine without CUDA: "cpu"
# --smoke: the V2-Lite layout (64 experts, top-6, MLA, 1 dense layer) at toy width, 3 layers
SMOKE = dict(SHAPES["v2-lite"], vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
             qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
NO_BULK = 1 << 62  # a bulk_min_tokens no call reaches


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


class LayerByLayerExperts(nn.Module):
    """The naive baseline: all of a layer's experts copied to a shared GPU buffer each time the layer runs, in
    stream order, so the layer's compute waits for its whole copy (what accelerate's CPU-offload hooks do)."""

    def __init__(self, cpu_gate_up: torch.Tensor, cpu_down: torch.Tensor, buffers: tuple[torch.Tensor, torch.Tensor]):
        super().__init__()
        self.cpu_gate_up, self.cpu_down = cpu_gate_up, cpu_down
        self.buffers = buffers

    def forward(self, x, ids, weights):
        gate_up, down = self.buffers
        gate_up.copy_(self.cpu_gate_up, non_blocking=True)
        down.copy_(self.cpu_down, non_blocking=True)
        return fused_moe(x, gate_up, down, ids, weights)


class ReferenceExperts(nn.Module):
    """The same GPU weights through fused_moe_ref: the bf16 noise floor of a different summation order."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.inner = experts

    def forward(self, x, ids, weights):
        return fused_moe_ref(x, self.inner.gate_up_proj, self.inner.down_proj, ids, weights)


def set_policy(model, name: str) -> None:
    cap, balance = {"balanced": (64, True), "copy_only": (0, True), "cpu_first": (8, False)}[name]
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            m.cpu_max_tokens, m.balance = cap, balance


def set_bulk(model, min_tokens: int) -> None:
    """The bulk path's token threshold (one setting, shared by every layer); NO_BULK turns it off."""
    for m in model.modules():
        if isinstance(m, OffloadedExperts) and m.bulk is not None:
            m.bulk.min_tokens = min_tokens


def path_taken(stats: dict) -> str:
    """Which path the calls counted in `stats` took."""
    bulk, calls = stats["bulk_calls"], stats["calls"]
    return "bulk" if bulk == calls > 0 else "per_expert" if bulk == 0 else "mixed"


def gpu_memory_GiB() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None


def small_checkpoint(path: Path) -> dict:
    """make_checkpoint for the --smoke shape, built on DEV (make_checkpoint builds on CUDA)."""
    torch.manual_seed(0)
    with torch.device(DEV):
        model = config_from_hf(SMOKE).build().to(torch.bfloat16)
    model.init_weights(std=0.02)
    save_model(model, path)
    build_tokenizer(path)
    cover_vocab(path, SMOKE["vocab_size"])
    return {"params": sum(p.numel() for p in model.parameters())}


def swap_to_naive(model) -> list[OffloadedExperts]:
    """Replace each OffloadedExperts (whose pinned CPU weights it reuses) by a LayerByLayerExperts; returns the
    originals, for swapping back."""
    layers = [m for m in model.modules() if hasattr(m, "experts") and isinstance(m.experts, OffloadedExperts)]
    first = layers[0].experts
    buffers = (torch.empty_like(first.cpu_gate_up, device=DEV), torch.empty_like(first.cpu_down, device=DEV))
    originals = []
    for m in layers:
        originals.append(m.experts)
        m.experts = LayerByLayerExperts(m.experts.cpu_gate_up, m.experts.cpu_down, buffers)
    return originals


def swap_back(model, originals) -> None:
    layers = [m for m in model.modules() if hasattr(m, "experts") and isinstance(m.experts, LayerByLayerExperts)]
    for m, orig in zip(layers, originals):
        m.experts = orig
    gc.collect()
    torch.cuda.empty_cache()


def ceilings() -> dict:
    """Host<->device copy bandwidth from pinned memory, and the CPU's rate on one expert's GEMVs (bf16)."""
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    sync()
    t = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    sync()
    h2d = 5 * n / (time.perf_counter() - t)
    del host, dev
    w = torch.randn(64, 2816, 2048).to(torch.bfloat16)  # 64 experts' gate_up: 740 MB, more than any cache
    x = torch.randn(1, 2048).to(torch.bfloat16)
    for e in range(4):
        torch.nn.functional.linear(x, w[e])
    t = time.perf_counter()
    for e in range(64):
        torch.nn.functional.linear(x, w[e])
    cpu = w.nbytes / (time.perf_counter() - t)
    return {"h2d_pinned_GBps": h2d / 1e9, "cpu_bf16_gemv_weight_GBps": cpu / 1e9,
            "cpu_threads": torch.get_num_threads()}


def decode_tok_per_s(llm, new: int, seed: int) -> float:
    p = random_prompts(1, 128, VOCAB, seed)[0]
    r = llm.generate(p, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))[0]
    return (new - 1) / (r.metrics.finish_time - r.metrics.first_token_time)


def prefill_tok_per_s(llm, length: int, seed: int, runs: int = 2) -> float:
    """The best of `runs` prefills of fresh prompts (no prefix-cache hit)."""
    best = 0.0
    for i in range(runs):
        p = random_prompts(1, length, VOCAB, seed + 7919 * i)[0]
        sync()
        t = time.perf_counter()
        llm.generate(p, SamplingParams(temperature=0, max_tokens=1))
        best = max(best, length / (time.perf_counter() - t))
    return best


@torch.inference_mode()
def teacher_forced(model, seqs: list[list[int]]) -> torch.Tensor:
    """(n, L, vocab) float32 logits on the CPU, one sequence at a time."""
    return torch.stack([model(torch.tensor([s], device=DEV))[0].float().cpu() for s in seqs])


def check_float32(path: Path, budget_gb: float) -> dict:
    """3-layer cut in float32: all-on-GPU, hybrid (CPU-compute, copy-in and bulk paths) and naive must generate
    the same greedy tokens (float32 sums in a different order differ by ~1e-6, far below the logit gaps)."""
    prompts = random_prompts(4, 40, VOCAB, seed=7)
    ref_model = load_model(path, device=DEV, dtype="float32", progress=False)
    expected = reference_generate(ref_model, prompts, 24)
    ref_logits = teacher_forced(ref_model, [p + e for p, e in zip(prompts, expected)])
    del ref_model
    gc.collect()
    torch.cuda.empty_cache()
    out = {}
    model = load_offloaded(path, DEV, "float32", budget_gb)
    # the per-expert path's policies (bulk off), then the bulk path on every call, decode steps included
    for name, bulk in (("balanced", NO_BULK), ("copy_only", NO_BULK), ("cpu_first", NO_BULK), ("bulk", 1)):
        set_policy(model, "balanced" if name == "bulk" else name)
        set_bulk(model, bulk)
        got = reference_generate(model, prompts, 24)
        logits = teacher_forced(model, [p + e for p, e in zip(prompts, expected)])
        out[name] = {"greedy_identical": got == expected,
                     "max_abs_logit_diff": (logits - ref_logits).abs().max().item(),
                     "stats": offload_stats(model, reset=True)}
    originals = swap_to_naive(model)
    out["naive"] = {"greedy_identical": reference_generate(model, prompts, 24) == expected}
    swap_back(model, originals)
    out["slots_per_layer"] = model.offload_summary["slots_per_layer"]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    global DEV, VOCAB
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/mixr-bench-offload")
    ap.add_argument("--budget-gb", type=float, default=4.0)
    ap.add_argument("--bulk-min-tokens", type=int, default=None,
                    help="the hybrid's bulk-path threshold (default: mixr.offload's); 0 turns the bulk path off")
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--naive-decode-tokens", type=int, default=6)
    ap.add_argument("--smoke", action="store_true",
                    help="a toy-width 3-layer V2-Lite layout with 8 of 64 experts resident, short runs, on CUDA if "
                         "present else the CPU: checks that every stage runs, measures nothing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        DEV = "cuda" if torch.cuda.is_available() else "cpu"
        VOCAB = SMOKE["vocab_size"]
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA device (or --smoke)")
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    result = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
              "smoke": args.smoke, "budget_gb": args.budget_gb, "ceilings": ceilings() if DEV == "cuda" else None}

    # 1. correctness in float32 on a 3-layer cut (1 dense + 2 MoE layers); budget: 4 of 64 experts per layer
    if args.smoke:
        path = root / "smoke"
        result["checkpoint"] = small_checkpoint(path)
        H, I = SMOKE["hidden_size"], SMOKE["moe_intermediate_size"]
        args.budget_gb = 8 * 2 * 3 * H * I * 2 / 1e9  # bf16: 8 of 64 experts in each of the 2 MoE layers
        result["budget_gb"] = args.budget_gb
        result["float32_check"] = check_float32(path, 4 * 2 * 3 * H * I * 4 / 1e9)
    else:
        small = root / "v2-lite-3layers"
        make_checkpoint("v2-lite", 3, small)
        expert_f32 = 3 * 2048 * 1408 * 4
        result["float32_check"] = check_float32(small, 4 * 2 * expert_f32 / 1e9)
        shutil.rmtree(small)
    emit(result, args.out)  # after each stage, so a later one that runs out of time loses nothing

    # 2. full depth, bf16
    if not args.smoke:
        path = root / "v2-lite"
        result["checkpoint"] = make_checkpoint("v2-lite", None, path)
        result["checkpoint"].pop("config")
    common = dict(device=DEV, dtype="bfloat16", max_model_len=16384, max_num_seqs=4, max_num_batched_tokens=8192,
                  kv_cache_bytes=2 << 30)
    lengths = (512, 2048, 8192)
    if args.smoke:
        common.update(max_model_len=1024, kv_cache_bytes=32 << 20)
        lengths = (16, 256)  # below and above the default bulk threshold
        args.decode_tokens, args.naive_decode_tokens = 6, 3
    check_prompts = random_prompts(4, 32, VOCAB, seed=11)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

    t = time.perf_counter()
    llm = LLM(path, **common)
    r = {"cold_start_seconds": time.perf_counter() - t}
    expected = [o.token_ids for o in llm.generate(check_prompts, greedy)]
    seqs = [p + e for p, e in zip(check_prompts, expected)]
    ref_logits = teacher_forced(llm.model, seqs)
    moes = [m for m in llm.model.modules() if hasattr(m, "experts")]
    for m in moes:
        m.experts = ReferenceExperts(m.experts)
    logits = teacher_forced(llm.model, seqs)
    for m in moes:
        m.experts = m.experts.inner
    r["bf16_noise_floor_reference_kernels"] = {
        "teacher_forced_top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (logits - ref_logits).abs().max().item()}
    decode_tok_per_s(llm, 16, seed=1)  # warm-up
    r["decode_tok_per_s"] = decode_tok_per_s(llm, args.decode_tokens, seed=2)
    for L in lengths:
        prefill_tok_per_s(llm, L, seed=100 + L, runs=1)  # warm-up
        r[f"prefill_{L}_tok_per_s"] = prefill_tok_per_s(llm, L, seed=200 + L)
    r["peak_gpu_memory_GiB"] = gpu_memory_GiB()
    result["all_gpu"] = r
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    save(result, args.out)

    t = time.perf_counter()
    llm = LLM(path, expert_offload="cpu", gpu_expert_budget_gb=args.budget_gb, **common)
    if args.bulk_min_tokens is not None:
        set_bulk(llm.model, args.bulk_min_tokens or NO_BULK)
    bulk_min = next((m.bulk.min_tokens for m in llm.model.modules()
                     if isinstance(m, OffloadedExperts) and m.bulk is not None), None)
    r = {"cold_start_seconds": time.perf_counter() - t, "summary": llm.model.offload_summary,
         "bulk_min_tokens": None if bulk_min in (None, NO_BULK) else bulk_min}
    got = [o.token_ids for o in llm.generate(check_prompts, greedy)]
    logits = teacher_forced(llm.model, seqs)
    r["check"] = {
        "teacher_forced_top1_agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
        "max_abs_logit_diff": (logits - ref_logits).abs().max().item(),
        "ref_logit_absmax": ref_logits.abs().max().item(),
        "greedy_token_agreement": sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e)) / (4 * 32),
        "stats": offload_stats(llm.model, reset=True)}
    r["check"]["path"] = path_taken(r["check"]["stats"])
    decode_tok_per_s(llm, 64, seed=3)  # warm-up: kernels, and the cache adapts to decode traffic
    offload_stats(llm.model, reset=True)
    r["decode_tok_per_s"] = decode_tok_per_s(llm, args.decode_tokens, seed=2)
    r["decode_stats"] = offload_stats(llm.model, reset=True)
    r["decode_path"] = path_taken(r["decode_stats"])  # the prompt's prefill included
    for L in lengths:
        prefill_tok_per_s(llm, L, seed=100 + L, runs=1)  # warm-up
        offload_stats(llm.model, reset=True)
        r[f"prefill_{L}_tok_per_s"] = prefill_tok_per_s(llm, L, seed=200 + L)
        r[f"prefill_{L}_stats"] = offload_stats(llm.model, reset=True)
        r[f"prefill_{L}_path"] = path_taken(r[f"prefill_{L}_stats"])
    # the same prefills on the per-expert path alone (what the hybrid did before the bulk path)
    set_bulk(llm.model, NO_BULK)
    no_bulk = {}
    for L in lengths:
        no_bulk[f"prefill_{L}_tok_per_s"] = prefill_tok_per_s(llm, L, seed=500 + L, runs=1 if L > 2048 else 2)
        no_bulk[f"prefill_{L}_stats"] = offload_stats(llm.model, reset=True)
        no_bulk[f"prefill_{L}_path"] = path_taken(no_bulk[f"prefill_{L}_stats"])
    r["no_bulk"] = no_bulk
    r["speedup_bulk_over_no_bulk"] = {L: r[f"prefill_{L}_tok_per_s"] / no_bulk[f"prefill_{L}_tok_per_s"]
                                      for L in lengths}
    policies = {}  # the per-expert path's miss policies, bulk still off
    for i, name in enumerate(("copy_only", "cpu_first")):
        set_policy(llm.model, name)
        policies[name] = {"decode_tok_per_s": decode_tok_per_s(llm, 24 if not args.smoke else 4, seed=4),
                          f"prefill_{lengths[0]}_tok_per_s": prefill_tok_per_s(llm, lengths[0], seed=300 + i),
                          f"prefill_{lengths[1]}_tok_per_s": prefill_tok_per_s(llm, lengths[1], seed=400 + i,
                                                                              runs=1)}
        policies[name]["stats"] = offload_stats(llm.model, reset=True)
    set_policy(llm.model, "balanced")
    set_bulk(llm.model, bulk_min or NO_BULK)
    r["policies"] = policies
    r["peak_gpu_memory_GiB"] = gpu_memory_GiB()
    result["hybrid"] = r
    save(result, args.out)

    originals = swap_to_naive(llm.model)
    got = llm.generate(check_prompts[0], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids
    r = {"check_greedy_token_agreement": sum(a == b for a, b in zip(got, expected[0][:8])) / 8}
    r["decode_tok_per_s"] = decode_tok_per_s(llm, args.naive_decode_tokens, seed=2)
    for L in lengths:
        r[f"prefill_{L}_tok_per_s"] = prefill_tok_per_s(llm, L, seed=200 + L)
    result["naive_layer_by_layer"] = r
    swap_back(llm.model, originals)
    h, a, n = result["hybrid"], result["all_gpu"], result["naive_layer_by_layer"]
    keys = ["decode_tok_per_s"] + [f"prefill_{L}_tok_per_s" for L in lengths]
    result["speedup_hybrid_over_naive"] = {k: h[k] / n[k] for k in keys}
    result["hybrid_fraction_of_all_gpu"] = {k: h[k] / a[k] for k in keys}
    emit(result, args.out)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
