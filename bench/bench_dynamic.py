"""Dynamic expert count per token (mixr.layers.moe: top-p and entropy rules) against exact top-k.

For each setting: routed experts run per token (the routers' device counters), KL(exact || dynamic) of the
next-token distribution and teacher-forced top-1 agreement on held-out sequences, greedy generation token
agreement with exact top-k, held-out task accuracy (engine generation scored by the task verifier), and decode
tok/s. The "best" setting is the one with the fewest experts per token whose accuracy is within 1 point of exact.

  CPU (default): a tiny DeepSeek-V3-style MoE (16 routed experts, top-4, sigmoid noaux_tc routing) is SFT'd on
      1-2 digit addition with scratchpads inside the run (mixr.train.sft.train), then evaluated on the task
      suite's held-out split of the same problems.
  --model DIR: a trained model instead (e.g. the built-in default model once it ships), on --tasks.
  --gpu: on CUDA (bf16, CUDA graphs). Without --model, the random DeepSeek-V2-Lite shape (bench_engine's
      checkpoint): everything but accuracy, which random weights cannot have; decode at batch 1 and 32.

    PYTHONPATH=. python bench/bench_dynamic.py --out bench/results/dynamic-experts-cpu-DATE.json
    PYTHONPATH=. python bench/bench_dynamic.py --gpu --out results.json      # ~4 min on one H100
"""

import argparse
import gc
import inspect
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import emit

from mixr import LLM, SamplingParams
from mixr.layers.moe import dynamic_expert_stats, set_dynamic_experts
from mixr.tiny_tokenizer import build_tokenizer
from mixr.train.config import TrainConfig
from mixr.train.sft import train
from mixr.train.tasks import TASKS, Arithmetic, generate

SETTINGS = [None] + [("top_p", p) for p in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)] + \
    [("entropy", s) for s in (0.5, 0.6, 0.7, 0.8, 0.9)]
GPU_SETTINGS = [None, ("top_p", 0.5), ("top_p", 0.7), ("top_p", 0.9), ("entropy", 0.6), ("entropy", 0.8)]

# The tiny model trained on CPU: DeepSeek-V3's routing (sigmoid scores, noaux_tc groups, normalised weights,
# shared expert) at a size two CPU cores train in minutes. 16 experts with top-4 leave room to drop some.
TINY = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 96,
        "intermediate_size": 192, "moe_intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 16, "n_shared_experts": 1,
        "num_experts_per_tok": 4, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 4, "topk_group": 2,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 512, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32"}
ADDITION = Arithmetic(max_digits=2, ops=("+",))  # named "arithmetic": its held-out split is the suite's


def label(setting) -> str:
    return "exact" if setting is None else f"{setting[0]}={setting[1]}"


def apply(llm: LLM, setting, graphs: bool) -> None:
    if setting is None:
        set_dynamic_experts(llm.model, None)
    else:
        rule, value = setting
        set_dynamic_experts(llm.model, rule, **({"top_p": value} if rule == "top_p" else {"entropy_scale": value}))
    if graphs:  # captured graphs replay the routing they were captured with: capture again
        runner = llm.engine.runner
        sizes = sorted(runner.graphs)
        runner.graphs.clear()
        torch.cuda.empty_cache()
        runner._capture(sizes)


def train_tiny(out: Path, steps: int, examples: int, seed: int) -> Path:
    tok_dir = out / "tokenizer"
    # one token per digit, so the scratchpad's columns line up with the operands' digits (when supported)
    kw = {"split_digits": True} if "split_digits" in inspect.signature(build_tokenizer).parameters else {}
    build_tokenizer(tok_dir, **kw)
    rows = [{"prompt": it.prompt, "completion": it.solution} for it in generate(ADDITION, examples, seed=seed)]
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(mode="sft", out_dir=str(out / "run"), model_config=TINY, tokenizer=str(tok_dir),
                      data=str(data), steps=steps, batch_size=32, lr=3e-3, warmup_steps=30, min_lr_ratio=0.1,
                      weight_decay=0.0, max_len=192, log_every=10, progress=False, seed=seed)
    t = time.perf_counter()
    train(cfg)
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    print(f"trained {steps} steps in {time.perf_counter() - t:.0f} s, final loss {log[-1]['lm_loss']:.3f}", flush=True)
    return out / "run" / f"checkpoint-{steps:06d}"


@torch.inference_mode()
def teacher_forced(llm: LLM, seqs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Float32 log-probs (n_completion, vocab) at each completion position, one sequence at a time (no padding,
    so the routers' counters see real tokens only)."""
    out = []
    for prompt, completion in seqs:
        ids = torch.tensor([prompt + completion], device=llm.device)
        logits = llm.model(ids)[0, len(prompt) - 1:-1].float()
        out.append(F.log_softmax(logits, -1).cpu())
    return out


def decode_tok_per_s(llm: LLM, prompt: list[int], new: int, batch: int = 1) -> float:
    res = llm.generate([prompt] * batch, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    return statistics.mean((new - 1) / (r.metrics.finish_time - r.metrics.first_token_time) for r in res) * batch


def evaluate(llm: LLM, settings, graphs: bool, items, tasks, seqs, gen_prompts, gen_tokens: int,
             speed_prompt: list[int], speed_tokens: int, batches: list[int]) -> dict:
    results, exact_lp, exact_gen, exact_correct = {}, None, None, None
    for setting in settings:
        apply(llm, setting, graphs)
        r = {}
        # teacher-forced: experts per token, KL and top-1 agreement against exact
        dynamic_expert_stats(llm.model, reset=True)
        lp = teacher_forced(llm, seqs)
        stats = dynamic_expert_stats(llm.model, reset=True)
        k = llm.model.config.num_experts_per_tok
        r["avg_experts_per_token"] = stats["avg_experts_per_token"] if stats else float(k)
        r["expert_compute_fraction"] = r["avg_experts_per_token"] / k
        if stats:
            r["experts_histogram"] = stats["histogram"]
            r["per_layer_avg"] = stats["per_layer_avg"]
        if exact_lp is None:
            exact_lp = lp
        kl = [(e.exp() * (e - d)).sum(-1) for e, d in zip(exact_lp, lp)]
        r["kl_mean"] = torch.cat(kl).mean().item()
        r["kl_p99"] = torch.cat(kl).quantile(0.99).item()
        r["top1_agreement"] = torch.cat([(e.argmax(-1) == d.argmax(-1)).float()
                                         for e, d in zip(exact_lp, lp)]).mean().item()
        # free-running greedy generation against exact
        gen = [o.token_ids for o in llm.generate(gen_prompts, SamplingParams(temperature=0, max_tokens=gen_tokens,
                                                                             ignore_eos=True))]
        exact_gen = exact_gen or gen
        r["greedy_token_agreement"] = sum(a == b for g, e in zip(gen, exact_gen) for a, b in zip(g, e)) / sum(
            map(len, exact_gen))
        r["greedy_identical_sequences"] = sum(g == e for g, e in zip(gen, exact_gen)) / len(gen)
        # held-out task accuracy
        if items:
            outs = llm.chat([[{"role": "user", "content": it.prompt}] for it in items],
                            SamplingParams(temperature=0, max_tokens=160))
            correct = [tasks[it.task].reward(o.text, it.answer).correct == 1.0 for it, o in zip(items, outs)]
            exact_correct = exact_correct or correct
            r["accuracy"] = sum(correct) / len(correct)
            r["accuracy_change_points"] = 100 * (r["accuracy"] - sum(exact_correct) / len(exact_correct))
            r["items_flipped"] = {"to_wrong": sum(e and not c for e, c in zip(exact_correct, correct)),
                                  "to_right": sum(c and not e for e, c in zip(exact_correct, correct))}
        # decode speed (dynamic counters stay on, as they would in use)
        decode_tok_per_s(llm, speed_prompt, 8)  # warm-up
        for b in batches:
            r[f"decode_batch{b}_tok_per_s"] = decode_tok_per_s(llm, speed_prompt, speed_tokens, b)
        results[label(setting)] = r
        print(label(setting), json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}), flush=True)
    apply(llm, None, graphs)
    return results


def best_setting(results: dict, max_loss_points: float = 1.0) -> dict | None:
    ok = [(r["avg_experts_per_token"], name) for name, r in results.items()
          if "accuracy_change_points" in r and r["accuracy_change_points"] > -max_loss_points]
    if not ok:
        return None
    avg, name = min(ok)
    exact = results["exact"]["avg_experts_per_token"]
    return {"setting": name, "avg_experts_per_token": avg, "expert_compute_saved": 1 - avg / exact,
            "accuracy_change_points": results[name]["accuracy_change_points"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--model", default=None, help="a trained model directory (default: train a tiny one on CPU)")
    ap.add_argument("--tasks", default="arithmetic", help="with --model: task suite names, comma-separated")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--train-examples", type=int, default=8000)
    ap.add_argument("--eval-items", type=int, default=400)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--layers", type=int, default=None, help="--gpu without --model: cut V2-Lite's depth")
    ap.add_argument("--dir", default="/tmp/mixr-bench-dynamic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    device = "cuda" if args.gpu else "cpu"
    result = {"device": torch.cuda.get_device_name() if args.gpu else "cpu", "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    random_v2 = args.gpu and not args.model
    if random_v2:
        from bench_engine import make_checkpoint, random_prompts
        path = root / "v2-lite"
        result["model"] = "random DeepSeek-V2-Lite shape (bf16)"
        make_checkpoint("v2-lite", args.layers, path)
        result["layers"] = args.layers or 27
        items, tasks = [], {}
        vocab = 102400
        seqs = [(p, c) for p, c in zip(random_prompts(8, 64, vocab, seed=1), random_prompts(8, 64, vocab, seed=2))]
        gen_prompts = random_prompts(8, 32, vocab, seed=3)
        speed_prompt = random_prompts(1, 128, vocab, seed=4)[0]
    else:
        if args.model:
            path = Path(args.model)
            names = args.tasks.split(",")
            tasks = {n: TASKS[n] for n in names}
            items = [it for n in names for it in generate(TASKS[n], args.eval_items // len(names), seed=args.seed,
                                                          split="test")]
            result["model"] = str(path)
        else:
            path = train_tiny(root, args.train_steps, args.train_examples, args.seed)
            tasks = {"arithmetic": ADDITION}
            items = generate(ADDITION, args.eval_items, seed=args.seed, split="test")
            result["model"] = {"trained_here": TINY, "task": "1-2 digit addition with a column scratchpad",
                               "train_steps": args.train_steps, "train_examples": args.train_examples,
                               "log_tail": (path.parent / "log.jsonl").read_text().splitlines()[-1]}
        result["eval_items"] = len(items)
    llm = LLM(path, device=device, dtype="bfloat16" if args.gpu else "float32", max_num_seqs=32 if args.gpu else 512,
              max_model_len=1024, kv_cache_bytes=(4 << 30) if args.gpu else (1 << 30))
    graphs = bool(llm.engine.runner.graphs)
    if not random_v2:
        tok = llm.tokenizer
        # held-out prompts with their reference solutions, for the teacher-forced measures
        seqs = [(tok.apply_chat_template([{"role": "user", "content": it.prompt}], add_generation_prompt=True,
                                         tokenize=True),
                 tok.encode(it.solution, add_special_tokens=False)) for it in items[:100]]
        gen_prompts = [p for p, _ in seqs[:32]]
        speed_prompt = seqs[0][0]
    result["settings"] = evaluate(llm, GPU_SETTINGS if random_v2 else SETTINGS, graphs, items, tasks, seqs,
                                  gen_prompts, 32, speed_prompt, 64 if args.gpu else 48,
                                  [1, 32] if args.gpu else [1, 64])
    if items:
        result["best_within_1_point"] = best_setting(result["settings"])
    emit(result, args.out)
    del llm
    gc.collect()
    if random_v2:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
