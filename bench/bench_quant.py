"""Weight-only quantization: quality (CPU) and speed/memory (GPU). Prints JSON and writes it to --out.

Quality (default, CPU): a tiny DeepSeek-V3-style model trained here by SFT on the task suite (or --model DIR),
run in bf16, then int8, int4 round-to-nearest and int4 GPTQ (and variants) built from the same bf16 weights.
Per variant: perplexity on the completions of held-out (test-split) task problems, logit KL and top-1 agreement
with bf16 on those tokens, greedy agreement with bf16 over 64 generated tokens, task accuracy and answer-format
rate of those 64-token answers. fp32 against bf16 is the noise floor of these comparisons. GPTQ calibrates on
train-split task text (disjoint from the held-out problems). The model trains once into --work and is reused.

    PYTHONPATH=. python bench/bench_quant.py --out bench/results/quant-quality-cpu-2026-11-23.json

GPU (--gpu): the random DeepSeek-V2-Lite-shaped checkpoint of bench_engine.py; for bf16, int8 and int4 (RTN, as
`LLM(..., quantization=...)` loads them) in one run: checks that the quantized modules compute what their
references do, then weight bytes, logit KL / top-1 / 64-token greedy agreement vs bf16, batch-1 decode and
batch-32 throughput; int4-GPTQ adds its KL.

    PYTHONPATH=. python bench/bench_quant.py --gpu --out bench/results/quant-v2lite-h100-2026-11-23.json
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import emit, save

from mixr.checkpoint import load_model
from mixr.quant import quantize_model
from mixr.quant.convert import weight_bytes

# the tiny model trained for the quality runs: every quantized layer is 128 or 256 wide, so int4 groups of 64 and
# 128 both fit
TINY = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 128,
    "intermediate_size": 256, "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 2, "topk_group": 1,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 1024, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32",
}
TASK_MIX = {"arithmetic": 1.0, "countdown": 1.0, "gsm8k": 1.0}
DEVICE = "cuda"  # of the --gpu run (a smoke test of the script may point it elsewhere)
KERNEL_CHECK = {"N": 1408, "K": 2048, "E": 64, "H": 2048, "I": 1408, "k": 6}  # V2-Lite's expert and layer widths

# (name, bits, group size, zero point, method, GPTQ options); None bits: the unquantized model. The last two
# rows ablate the GPTQ defaults: quantizing columns in order instead of largest-activation first, and per-expert
# Hessians without the shrinkage toward the layer's all-token Hessian.
QUALITY_VARIANTS = [
    ("bf16", None, None, False, None, {}),
    ("fp32", None, None, False, None, {}),  # against bf16: the noise floor of every comparison below
    ("int8-rtn", 8, None, False, "rtn", {}),
    ("int8-gptq", 8, None, False, "gptq", {}),
    ("int4-g128-rtn", 4, 128, False, "rtn", {}),
    ("int4-g128-gptq", 4, 128, False, "gptq", {}),
    ("int4-g64-rtn", 4, 64, False, "rtn", {}),
    ("int4-g64-gptq", 4, 64, False, "gptq", {}),
    ("int4-g128-zp-rtn", 4, 128, True, "rtn", {}),
    ("int4-g128-zp-gptq", 4, 128, True, "gptq", {}),
    ("int4-g128-gptq-in-order", 4, 128, False, "gptq", {"act_order": False}),
    ("int4-g128-gptq-no-prior", 4, 128, False, "gptq", {"prior_tokens": 0.0}),
]


# ---------------------------------------------------------------- shared measurements

def active_weight_bytes(model) -> int:
    """Weight bytes one decode token reads (parameters and the quantized modules' buffers): the embedding table
    counts one row, routed experts k of E."""
    k = model.config.num_experts_per_tok or 0
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        b = t.numel() * t.element_size()
        if name.endswith("embed_tokens.weight"):
            b = t.shape[1] * t.element_size()
        elif ".experts." in name:
            b = b * k // t.shape[0]
        total += b
    return total


def logit_metrics(ref_logp: torch.Tensor, logits: torch.Tensor) -> dict:
    """KL(ref || q) per token (nats) and top-1 agreement, over (N, V) rows."""
    logp = logits.float().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return {"kl_vs_bf16": kl.mean().item(), "kl_vs_bf16_p99": kl.quantile(0.99).item(),
            "top1_agreement_vs_bf16": (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()}


def greedy_agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    """Over free-running greedy generations: the share of the reference's tokens matched before the first
    divergence, and the share matched position by position."""
    prefix, same = [], []
    for a, b in zip(ref, got):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        prefix.append(n / len(a))
        same.append(sum(x == y for x, y in zip(a, b)) / len(a))
    return {"greedy_identical_prefix_fraction": statistics.mean(prefix),
            "greedy_positionwise_agreement": statistics.mean(same)}


# ---------------------------------------------------------------- quality on the CPU

def train_tiny(work: Path, steps: int, seed: int) -> Path:
    """SFT a tiny model on the task suite's reference solutions; reuses an earlier run in `work`."""
    from mixr.tiny_tokenizer import build_tokenizer
    from mixr.tokenizer import Tokenizer
    from mixr.train.config import TrainConfig
    from mixr.train.sft import train
    final = work / "train" / f"checkpoint-{steps:06d}"
    if (final / "model.safetensors").is_file():
        return final
    tok_dir = work / "tokenizer"
    build_tokenizer(tok_dir)
    tok = Tokenizer.from_dir(tok_dir)
    hf = dict(TINY, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = TrainConfig(mode="sft", out_dir=str(work / "train"), seed=seed, model_config=hf, tokenizer=str(tok_dir),
                      init_std=0.02, tasks=TASK_MIX, num_examples=6000, max_len=256, steps=steps, batch_size=16,
                      lr=2e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.0, log_every=10, progress=True)
    t = time.perf_counter()
    train(cfg)
    print(f"trained {steps} steps in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    return final


def sft_rows(tok, split: str, n: int, seed: int) -> list[tuple[list[int], list[int], object]]:
    """(prompt ids, completion ids incl. eos, item) for n problems per task of a split."""
    from mixr.train.sft import encode_example
    from mixr.train.tasks import TASKS, generate
    rows = []
    for name in TASK_MIX:
        for it in generate(TASKS[name], n, seed=seed, split=split):
            ids, mask = encode_example(tok, {"prompt": it.prompt, "completion": it.solution})
            k = mask.index(1)
            rows.append((ids[:k], ids[k:], it))
    return rows


def calibration_windows(tok, n_items: int, seq_len: int, seed: int) -> torch.Tensor:
    """Train-split task conversations, as the model saw them in SFT, concatenated and cut into windows."""
    stream = [t for p, c, _ in sft_rows(tok, "train", n_items, seed) for t in p + c]
    n = len(stream) // seq_len
    return torch.tensor(stream[:n * seq_len]).view(n, seq_len)


@torch.no_grad()
def eval_quality(model, rows, new_tokens: int) -> dict:
    """Summed NLL of the completion tokens, the logits that predicted them, and greedy continuations."""
    from mixr.reference import reference_generate
    nll, count, logits_at = 0.0, 0, []
    for p, c, _ in rows:
        logits = model(torch.tensor([p + c]))[0, len(p) - 1:-1].float()  # predictions of the completion tokens
        nll += F.cross_entropy(logits, torch.tensor(c), reduction="sum").item()
        count += len(c)
        logits_at.append(logits)
    gens = reference_generate(model, [p for p, _, _ in rows], new_tokens)
    return {"nll": nll, "tokens": count, "logits": torch.cat(logits_at), "gens": gens}


def quality(args) -> dict:
    from mixr.tokenizer import Tokenizer
    from mixr.train.tasks import TASKS
    work = Path(args.work)
    model_dir = Path(args.model) if args.model else train_tiny(work, args.steps, args.seed)
    tok = Tokenizer.from_dir(model_dir if (Path(model_dir) / "tokenizer.json").is_file() else work / "tokenizer")
    rows = sft_rows(tok, "test", args.eval_items, seed=args.seed)
    calib = calibration_windows(tok, args.calib_items, args.calib_len, seed=args.seed + 1)
    result = {"model": str(model_dir) if args.model else {"config": TINY, "sft_steps": args.steps,
                                                          "tasks": TASK_MIX},
              "eval": {"held_out_problems": len(rows), "split": "test", "greedy_new_tokens": args.new_tokens},
              "calibration": {"tokens": calib.numel(), "windows": list(calib.shape), "text": "train-split task "
                              "conversations (chat template + reference solution)"},
              "variants": {}}
    ref = None
    for name, bits, group, zp, method, options in QUALITY_VARIANTS:
        t = time.perf_counter()
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        model = load_model(model_dir, dtype=dtype, progress=False).eval()
        if bits is not None:
            quantize_model(model, method, bits, group, zp, calib if method == "gptq" else None, **options)
        qtime = time.perf_counter() - t
        out = eval_quality(model, rows, args.new_tokens)
        logp = out["logits"].log_softmax(-1)
        r = {"weight_bytes": weight_bytes(model), "quantize_seconds": qtime,
             "perplexity": float(torch.tensor(out["nll"] / out["tokens"]).exp())}
        # a 400-step model rarely solves a problem, but it does learn the answer format
        rewards = []
        for g, (_, _, it) in zip(out["gens"], rows):
            ids = g[:g.index(tok.eos_token_id)] if tok.eos_token_id in g else g
            rewards.append(TASKS[it.task].reward(tok.decode(ids), it.answer))
        r["task_accuracy"] = statistics.mean(x.correct or 0.0 for x in rewards)
        r["task_format_rate"] = statistics.mean(x.format for x in rewards)
        if name == "bf16":
            ref = {"logp": logp, "gens": out["gens"]}
        if ref is not None:
            r |= logit_metrics(ref["logp"], out["logits"]) | greedy_agreement(ref["gens"], out["gens"])
        result["variants"][name] = r
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}),
              file=sys.stderr)
        del model
    result |= summarize(result["variants"])
    return result


def summarize(v: dict) -> dict:
    """RTN against GPTQ per format, and the GPTQ ablations, from the variants' metrics. A KL within twice the
    fp32-vs-bf16 KL is noise: such a pair is a tie."""
    floor = 2 * v["fp32"]["kl_vs_bf16"]

    def compare(a: str, b: str) -> dict:
        ka, kb = v[a]["kl_vs_bf16"], v[b]["kl_vs_bf16"]
        return {"perplexity_increase_over_bf16": {n: v[n]["perplexity"] - v["bf16"]["perplexity"] for n in (a, b)},
                "kl_vs_bf16": {a: ka, b: kb},
                "kl_ratio": kb / ka,
                "top1_agreement_vs_bf16": {n: v[n]["top1_agreement_vs_bf16"] for n in (a, b)},
                "greedy_identical_prefix_fraction": {n: v[n]["greedy_identical_prefix_fraction"] for n in (a, b)},
                "better_by_kl": "tie (both within the bf16 noise floor)" if max(ka, kb) < floor
                else a if ka < kb else b}

    return {"noise_floor_kl_vs_bf16": floor,
            "gptq_vs_rtn": {f: compare(f"{f}-rtn", f"{f}-gptq")
                            for f in ("int8", "int4-g128", "int4-g64", "int4-g128-zp")},
            "gptq_ablation": {"act_order": compare("int4-g128-gptq", "int4-g128-gptq-in-order"),
                              "expert_hessian_prior": compare("int4-g128-gptq", "int4-g128-gptq-no-prior")}}


# ---------------------------------------------------------------- GPU: V2-Lite shape

def check_kernels() -> dict:
    """The quantized modules on CUDA against their plain-PyTorch references, on random inputs."""
    from mixr.kernels.fused_moe import fused_moe_ref
    from mixr.quant.modules import QuantExperts, QuantLinear
    from mixr.quant.rtn import QuantSpec, quantize_rtn
    g = torch.Generator(device=DEVICE).manual_seed(0)
    c = KERNEL_CHECK
    out = {}
    for spec in (QuantSpec(8), QuantSpec(4, 64), QuantSpec(4, 128, zero_point=True)):
        tag = f"int{spec.bits}" + (f"-g{spec.group_size}" if spec.bits == 4 else "") \
            + ("-zp" if spec.zero_point else "")
        w = torch.randn(c["N"], c["K"], device=DEVICE, generator=g, dtype=torch.bfloat16) * 0.02
        lin = QuantLinear(c["K"], c["N"], False, spec, torch.bfloat16, DEVICE)
        lin.set(*quantize_rtn(w, spec))
        for T in (1, 32, 300):
            x = torch.randn(T, c["K"], device=DEVICE, generator=g, dtype=torch.bfloat16)
            want = F.linear(x.float(), lin.dequantize(torch.float32))
            err = ((lin(x).float() - want).norm() / want.norm()).item()
            assert err < 1e-2, (tag, T, err)
            out[f"linear_{tag}_T{T}_rel_err"] = err
        E, H, I, k = c["E"], c["H"], c["I"], c["k"]
        ex = QuantExperts(E, H, I, spec, torch.bfloat16, DEVICE)
        ex.gate_up_proj.set(*quantize_rtn(torch.randn(E, 2 * I, H, device=DEVICE, generator=g,
                                                      dtype=torch.bfloat16) * 0.02, spec))
        ex.down_proj.set(*quantize_rtn(torch.randn(E, H, I, device=DEVICE, generator=g,
                                                   dtype=torch.bfloat16) * 0.02, spec))
        for T in (1, 32, 300):
            x = torch.randn(T, H, device=DEVICE, generator=g, dtype=torch.bfloat16)
            ids = torch.rand(T, E, device=DEVICE, generator=g).topk(k, -1).indices
            wts = torch.rand(T, k, device=DEVICE, generator=g)
            want = fused_moe_ref(x.float(), ex.gate_up_proj.dequantize(torch.float32),
                                 ex.down_proj.dequantize(torch.float32), ids, wts)
            err = ((ex(x, ids, wts).float() - want).norm() / want.norm()).item()
            assert err < 2e-2, (tag, T, err)
            out[f"experts_{tag}_T{T}_rel_err"] = err
    return out


def gpu(args) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_engine import SHAPES, ceilings, decode_rates, make_checkpoint, random_prompts

    from mixr import LLM, SamplingParams
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": "v2-lite (random)"}
    t0 = time.perf_counter()

    def save_stage():
        result["elapsed_seconds"] = time.perf_counter() - t0
        save(result, args.out)  # after every stage, so a stage that runs out of time loses nothing before it

    result["kernel_checks"] = check_kernels()
    result["ceilings"] = ceilings()
    save_stage()
    path = Path(args.dir)
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    ck = make_checkpoint("v2-lite", args.layers, path)
    ck.pop("config")
    result["checkpoint"] = ck
    result["layers"] = args.layers or SHAPES["v2-lite"]["num_hidden_layers"]
    vocab = SHAPES["v2-lite"]["vocab_size"]
    save_stage()
    eval_ids = torch.tensor(random_prompts(2, 256, vocab, seed=7), device=DEVICE)
    gen_prompts = random_prompts(4, 32, vocab, seed=8)
    new = args.new_tokens
    ref = None
    variants = result["variants"] = {}
    for q in ("bf16", "int8", "int4"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        llm = LLM(path, device=DEVICE, dtype="bfloat16", quantization=None if q == "bf16" else q,
                  max_model_len=1024, max_num_seqs=32, max_num_batched_tokens=4096)
        r = {"load_seconds": time.perf_counter() - t, "weight_bytes": weight_bytes(llm.model),
             "active_weight_bytes_per_token": active_weight_bytes(llm.model),
             "quantization_config": llm.model.config.hf.get("quantization_config"),
             "cuda_graph_batch_sizes": sorted(llm.engine.runner.graphs)}
        with torch.inference_mode():
            logits = llm.model(eval_ids).flatten(0, 1).float()
        gens = [o.token_ids for o in llm.generate(gen_prompts, SamplingParams(temperature=0, max_tokens=64,
                                                                             ignore_eos=True))]
        if q == "bf16":
            ref = {"logp": logits.log_softmax(-1), "gens": gens}
        else:
            r |= logit_metrics(ref["logp"], logits) | greedy_agreement(ref["gens"], gens)
        del logits
        r |= decode_rates(llm, [1, 32], 128, new, vocab)
        r["peak_gpu_memory_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
        # what share of the card's copy bandwidth batch-1 decode uses reading the weights a token needs
        r["batch1_fraction_of_weight_read_roofline"] = (r["batch1_decode_tok_per_s_per_seq"]
                                                        * r["active_weight_bytes_per_token"]
                                                        / (result["ceilings"]["copy_bandwidth_GBps"] * 1e9))
        variants[q] = r
        del llm
        gc.collect()
        save_stage()
    b = variants["bf16"]
    result["speedup_vs_bf16"] = {q: {"batch1_decode": variants[q]["batch1_decode_tok_per_s_per_seq"]
                                     / b["batch1_decode_tok_per_s_per_seq"],
                                     "batch32_output": variants[q]["batch32_output_tok_per_s"]
                                     / b["batch32_output_tok_per_s"],
                                     "weight_bytes": variants[q]["weight_bytes"] / b["weight_bytes"]}
                                 for q in ("int8", "int4")}
    s = result["speedup_vs_bf16"]
    result["targets"] = {"int4_batch1_decode_ge_1.8x": s["int4"]["batch1_decode"] >= 1.8,
                         "int8_batch1_decode_ge_1.4x": s["int8"]["batch1_decode"] >= 1.4}
    save_stage()
    if not args.skip_gptq:  # same format as int4 RTN, so the same speed: only its quality is new
        torch.cuda.empty_cache()
        t = time.perf_counter()
        model = load_model(path, device=DEVICE, dtype="bfloat16", progress=False).eval()
        group = variants["int4"]["quantization_config"]["group_size"]
        calib = torch.tensor(random_prompts(16, 256, vocab, seed=11))
        quantize_model(model, "gptq", 4, group, calib_ids=calib)
        r = {"quantize_seconds": time.perf_counter() - t, "calibration_tokens": calib.numel(), "group_size": group}
        with torch.inference_mode():
            logits = model(eval_ids).flatten(0, 1).float()
        variants["int4-gptq"] = r | logit_metrics(ref["logp"], logits)
        del model, logits
        save_stage()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="the V2-Lite-shape speed and KL run (CUDA)")
    ap.add_argument("--model", default=None, help="quality: a trained model directory instead of training one")
    ap.add_argument("--work", default="/tmp/mixr-bench-quant", help="quality: where the tiny model is trained")
    ap.add_argument("--steps", type=int, default=400, help="quality: SFT steps of the tiny model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-items", type=int, default=16, help="quality: held-out problems per task")
    ap.add_argument("--calib-items", type=int, default=40, help="quality: train-split problems per task")
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens (quality); decode tokens (--gpu)")
    ap.add_argument("--layers", type=int, default=None, help="--gpu: cut V2-Lite's depth")
    ap.add_argument("--dir", default="/tmp/mixr-bench-ckpt", help="--gpu: where the V2-Lite checkpoint is written")
    ap.add_argument("--skip-gptq", action="store_true", help="--gpu: no int4-GPTQ quality row")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs CUDA")
        result = gpu(args)
    else:
        result = {"device": "cpu", "torch": torch.__version__} | quality(args)
    emit(result, args.out)


if __name__ == "__main__":
    main()
