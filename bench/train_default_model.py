"""Train mixr's built-in default model: a few-million-parameter DeepSeek-V3-architecture MoE reasoning model,
SFT from scratch on the task suite (recipes/default_model/sft.toml), then GRPO (grpo.toml) over several seeds;
held-out accuracy per task after SFT and after GRPO, and the learning curves.

    # 1. tokenizer, SFT from scratch (--budget-s of training: the step count is fitted to it by short probe
    #    runs, with a hard stop at 1.15x), held-out eval (greedy; pass@8 at temperature 1): ~9.5 min on one H100
    #    (the shipped model: 1657 steps fitted, stopped by the time limit at 1612)
    PYTHONPATH=. python bench/train_default_model.py --stage sft --device cuda --budget-s 400 --quiet --out $OUT
    # 2. held-out eval of the SFT model, GRPO from it for each seed (--parallel: one process per seed, all at once
    #    on the one GPU, which a model this small leaves mostly idle), held-out eval of each GRPO model; the whole
    #    command ends within --deadline-s seconds
    PYTHONPATH=. python bench/train_default_model.py --stage grpo --init sft-model.tar --seeds 0 1 2 --parallel \
        --device cuda --deadline-s 520 --quiet --out $OUT          # the shipped model: 463 s per seed, ~103 steps
    # held-out eval of any model directories or tars
    PYTHONPATH=. python bench/train_default_model.py --stage eval --models A.tar B/ --out $OUT
    # the whole pipeline at toy scale on a CPU (seconds): checks the wiring, not the numbers
    PYTHONPATH=. python bench/train_default_model.py --stage all --smoke --out /tmp/default-model

Every stage writes a few files under --out (a GPU box returns at most 8): <stage>-metrics.json (settings,
timings, held-out accuracy per task with its binomial standard error and per-problem scores, learning curves),
<stage>-curve.svg, and the model directory as one tar in bf16 (sft-model.tar; grpo: default-model.tar, the first
seed's model, which is what ships in mixr/default_model/). --sft-set/--grpo-set KEY=VALUE (TOML values) override
recipe settings.

The held-out sets are fixed: the first --eval-examples test-split problems of seed 0 for each task (test-split
problems never occur in training, whatever the seeds; see mixr.train.tasks).
"""

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

import torch

from mixr import LLM
from mixr.checkpoint import load_model, save_model
from mixr.tiny_tokenizer import build_tokenizer, demo_corpus
from mixr.tokenizer import Tokenizer
from mixr.train.config import GRPOConfig, load_config
from mixr.train.grpo import evaluate, train_grpo
from mixr.train.plot import read_log, svg_curves
from mixr.train.sft import TOKENIZER_FILES, train
from mixr.train.tasks import TASKS, generate

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "default_model"
STARTED = time.perf_counter()
TASK_NAMES = list(TASKS)

# Toy scale for --smoke: the same code paths, minutes on a CPU.
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32,
                   qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_group=2,
                   topk_group=1, max_position_embeddings=512)
SMOKE_SFT = dict(num_examples=600, steps=30, batch_size=16, warmup_steps=5, log_every=1, dtype="float32")
SMOKE_GRPO = dict(num_prompts=200, prompts_per_step=4, group_size=4, max_tokens=48, micro_batch_size=16, steps=3,
                  eval_every=2, eval_examples=4, dtype="float32", max_num_seqs=64)


# ---------------------------------------------------------------- helpers

def parse_sets(pairs: list[str]) -> dict:
    """["lr=1e-4", "tasks={arithmetic=1.0}"] -> {"lr": 1e-4, ...}, values read as TOML."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--*-set takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    return out


def build_default_tokenizer(out_dir: Path) -> Tokenizer:
    """A byte-level BPE trained on the task suite's train-split text (plus a little English), digits split one per
    token so a number's digits line up with the scratchpad's columns; the R1 chat template that opens <think>."""
    corpus = demo_corpus()
    for task in TASKS.values():
        for item in generate(task, 3000, seed="tokenizer"):
            corpus += [item.prompt, item.solution]
    build_tokenizer(out_dir, vocab_size=1024, corpus=corpus, split_digits=True)
    tok = Tokenizer.from_dir(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_token_id, "eos_token_id": [tok.eos_token_id], "do_sample": True,
         "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")
    return Tokenizer.from_dir(out_dir)


def write_sft_data(tasks: dict[str, float], num_examples: int, seed: int, path: Path) -> Path:
    """The SFT rows as JSONL: train-split problems with their reference solutions, shared by the recipe's task
    weights. Drawn with repeats allowed, so each task keeps its own distribution (the held-out one): the trainer's
    built-in `tasks` draws distinct problems, which at 10^5 rows all but removes one-digit arithmetic."""
    total = sum(tasks.values())
    rows = []
    for name, weight in tasks.items():
        rows += [{"prompt": it.prompt, "completion": it.solution}
                 for it in generate(TASKS[name], round(num_examples * weight / total), seed=seed, split="train",
                                    unique=False)]
    random.Random(seed).shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def export(src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A checkpoint as the shippable model directory: weights in dtype (the router bias stays float32), config,
    tokenizer files; no optimizer state."""
    if dst.exists():
        shutil.rmtree(dst)
    save_model(load_model(src, dtype=dtype, progress=False), dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def tar_dir(src: Path, out: Path) -> Path:
    with tarfile.open(out, "w") as tar:
        for f in sorted(src.iterdir()):
            tar.add(f, arcname=f.name)
    return out


def model_from(path: str, work: Path) -> Path:
    """A model directory, or a tar of one extracted under work."""
    p = Path(path)
    if p.is_dir():
        return p
    dst = work / p.name.removesuffix(".tar")
    with tarfile.open(p) as tar:
        tar.extractall(dst, filter="data")
    return dst


def param_counts(model_dir: Path) -> dict:
    """Total parameters, and those active per token (shared weights plus top_k of the routed experts)."""
    hf = json.loads((model_dir / "config.json").read_text())
    model = load_model(model_dir, progress=False)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - routed + routed * hf["num_experts_per_tok"] // hf["n_routed_experts"]
    return {"total": total, "routed_experts": routed, "active_per_token": active}


def held_out(model: Path, args, samples: int = 1) -> dict:
    """Greedy held-out accuracy per task (with samples > 1: also pass@samples at temperature 1 on fewer problems)."""
    llm = LLM(model, device=args.device, max_num_seqs=512 if not args.smoke else 64)
    t0 = time.perf_counter()
    scores = evaluate(llm, TASK_NAMES, args.eval_examples, max_tokens=args.eval_max_tokens, details=True)
    for name in TASK_NAMES:  # binomial standard error of each accuracy: the sampling noise of the held-out set
        a = scores[name]["accuracy"]
        scores[name]["stderr"] = math.sqrt(a * (1 - a) / args.eval_examples)
    if samples > 1:
        n = max(4, args.eval_examples // 3)
        sampled = evaluate(llm, TASK_NAMES, n, max_tokens=args.eval_max_tokens, samples=samples, temperature=1.0)
        for name in TASK_NAMES:
            scores[name]["sampled_accuracy@T1"] = sampled[name]["accuracy"]
            scores[name][f"pass@{samples}"] = sampled[name][f"pass@{samples}"]
    scores["eval_s"] = time.perf_counter() - t0
    del llm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return scores


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    print(f"wrote {path}", flush=True)


def env() -> dict:
    return {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---------------------------------------------------------------- stages

def sft_config(args, work: Path, tok_dir: Path, **kw):
    over = {"out_dir": str(work / "sft"), "tokenizer": str(tok_dir), "device": args.device,
            "progress": not args.quiet}
    if args.smoke:
        over |= SMOKE_SFT
    over |= kw | parse_sets(args.sft_set)
    cfg = load_config(RECIPE / "sft.toml", **over)
    data = work / "sft-data.jsonl"  # written once per work directory; the probes reuse it
    if not data.is_file():
        write_sft_data(cfg.tasks, cfg.num_examples, cfg.seed, data)
    cfg = load_config(RECIPE / "sft.toml", **over | {"data": str(data), "tasks": {}})
    if args.smoke:
        cfg.model_config = cfg.model_config | SMOKE_MODEL
    if args.device == "cpu":
        cfg.dtype = "float32"  # CPU bf16 autocast is slow and buys nothing here
    return cfg


def fit_steps(args, work: Path, tok_dir: Path, budget_s: float) -> tuple[int, float]:
    """Seconds per SFT step, from two short runs on a small data set (their difference cancels start-up and
    warm-up), and the number of steps that fit in budget_s."""
    times = {}
    for n in (3, 5, 25):  # the 3-step run only warms up (CUDA context, allocator, kernel compiles)
        cfg = sft_config(args, work / f"probe{n}", tok_dir, steps=n, num_examples=4 * 256, warmup_steps=1,
                         progress=False)
        t0 = time.perf_counter()
        train(cfg)
        times[n] = time.perf_counter() - t0
        shutil.rmtree(work / f"probe{n}")
    per_step = max((times[25] - times[5]) / 20, 1e-3)
    return int(budget_s / per_step), per_step


def stage_sft(args, work: Path, out: Path) -> Path:
    timings = {}
    t0 = time.perf_counter()
    tok_dir = work / "tokenizer"
    tok = build_default_tokenizer(tok_dir)
    timings["tokenizer_s"] = time.perf_counter() - t0

    cfg = sft_config(args, work, tok_dir)
    probe = None
    if args.budget_s and not args.smoke and "steps" not in parse_sets(args.sft_set):
        fit, per_step = fit_steps(args, work, tok_dir, args.budget_s)
        probe = {"seconds_per_step": per_step, "steps_that_fit": fit}
        cfg.steps = max(1, min(cfg.steps, fit))
        cfg.warmup_steps = min(cfg.warmup_steps, cfg.steps // 10)
        # A hard stop if the probes were optimistic: the run then ends early in its cosine schedule.
        cfg.time_limit_s = 1.15 * args.budget_s
        print(f"sft: {per_step * 1e3:.1f} ms/step; running {cfg.steps} steps "
              f"(probes done at {time.perf_counter() - STARTED:.0f} s)", flush=True)
    t0 = time.perf_counter()
    train(cfg)
    timings["sft_s"] = time.perf_counter() - t0
    ckpt = max(Path(cfg.out_dir).glob("checkpoint-*"))  # checkpoint-<steps run>, zero-padded
    print(f"sft: trained {ckpt.name} in {timings['sft_s']:.0f} s", flush=True)
    model_dir = export(ckpt, work / "sft-model")
    tar_dir(model_dir, out / "sft-model.tar")

    t0 = time.perf_counter()
    scores = held_out(model_dir, args, samples=8)
    timings["eval_s"] = time.perf_counter() - t0
    print(f"sft: held-out eval in {timings['eval_s']:.0f} s", flush=True)
    log = read_log(Path(cfg.out_dir) / "log.jsonl")
    curve = [{"step": r["step"], "loss": r["loss"], "lr": r["lr"], "load_imbalance": r["load_imbalance"]}
             for r in log]
    (out / "sft-curve.svg").write_text(svg_curves({"loss": [(r["step"], r["loss"]) for r in log]},
                                                  title="SFT loss (completion tokens)"))
    write_json(out / "sft-metrics.json", {
        "env": env(), "config": cfg.to_dict(), "vocab_size": len(tok), "params": param_counts(model_dir),
        "probe": probe, "timings": timings, "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in log),
        "held_out": scores, "curve": curve})
    return model_dir


def grpo_config(args, work: Path, init: Path, seed: int, **kw) -> GRPOConfig:
    over = {"model": str(init), "out_dir": str(work / f"grpo-seed{seed}"), "seed": seed, "device": args.device,
            "progress": not args.quiet}
    if args.smoke:
        over |= SMOKE_GRPO
    if args.device == "cpu":
        over["dtype"] = "float32"
    return load_config(RECIPE / "grpo.toml", GRPOConfig, **over | kw | parse_sets(args.grpo_set))


def paired_gain(before: list[int], after: list[int]) -> tuple[float, float]:
    """Mean per-problem change in correctness on the same held-out problems, and its standard error."""
    d = [a - b for a, b in zip(after, before)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def summarize(sft: dict, runs: dict[int, dict]) -> dict:
    """Per task: SFT accuracy, GRPO accuracy per seed with its mean and std over seeds (run-to-run noise), and
    the gain per seed with its paired standard error over the held-out problems (sampling noise of the set)."""
    out = {}
    for name in TASK_NAMES + ["mean"]:
        after = [runs[s]["held_out"][name]["accuracy"] for s in runs]
        before = sft[name]["accuracy"]
        out[name] = {"sft": before, "grpo_per_seed": after, "grpo_mean": statistics.fmean(after),
                     "grpo_std_over_seeds": statistics.stdev(after) if len(after) > 1 else None,
                     "gain_mean": statistics.fmean(after) - before,
                     "gain_per_seed": [a - before for a in after]}
        if name != "mean":
            out[name]["sft_stderr"] = sft[name]["stderr"]
            out[name]["gain_paired_stderr_per_seed"] = [
                paired_gain(sft[name]["correct"], runs[s]["held_out"][name]["correct"])[1] for s in runs]
    return out


def seed_time_limit(args, started: float, seeds_left: int) -> float:
    """Seconds of GRPO for the next seed: --budget-s, and with --deadline-s (counted from the start of the
    process) an equal share of what is left after reserving --reserve-s per seed for export and evaluation."""
    limits = [args.budget_s] if args.budget_s else []
    if args.deadline_s:
        left = args.deadline_s - (time.perf_counter() - started)
        limits.append(max(left / seeds_left - args.reserve_s, 10.0))
    return min(limits, default=0.0)


def run_seed(args, work: Path, init: Path, seed: int, time_limit_s: float) -> dict:
    """GRPO from init with one seed, then the held-out evaluation of its final model (exported as shipped)."""
    cfg = grpo_config(args, work, init, seed, time_limit_s=time_limit_s)
    print(f"grpo seed {seed}: time limit {cfg.time_limit_s:.0f} s", flush=True)
    t0 = time.perf_counter()
    train_grpo(cfg)  # returns the policy; what is evaluated is the exported final checkpoint, as shipped
    train_s = time.perf_counter() - t0
    log = read_log(Path(cfg.out_dir) / "log.jsonl")
    last = max(r["step"] for r in log)
    model_dir = export(Path(cfg.out_dir) / f"checkpoint-{last:06d}", work / f"grpo-model-seed{seed}")
    scores = held_out(model_dir, args)
    print(f"seed {seed} held-out:", {k: v["accuracy"] for k, v in scores.items() if isinstance(v, dict)}, flush=True)
    steps = [r for r in log if "reward" in r]
    return {"config": cfg.to_dict(), "steps": last, "train_s": train_s, "held_out": scores,
            "seconds_per_step": statistics.median(r["step_s"] for r in steps) if steps else None,
            "rollout_s_per_step": statistics.median(r["rollout_s"] for r in steps) if steps else None,
            "model_dir": str(model_dir), "log": log}


def run_seeds_in_parallel(args, work: Path, init: Path) -> dict[int, dict]:
    """One process per seed, all at once on the one device: a few-million-parameter model leaves the GPU idle
    between kernel launches, so the seeds' host-side work (sampling, scheduling, Python) overlaps."""
    limit = seed_time_limit(args, STARTED, 1)
    common = ["--init", str(init), "--work", str(work), "--out", str(work), "--device", args.device,
              "--budget-s", str(limit), "--eval-examples", str(args.eval_examples),
              "--eval-max-tokens", str(args.eval_max_tokens), "--quiet"]
    common += [f"--grpo-set={x}" for x in args.grpo_set] + (["--smoke"] if args.smoke else [])
    # CPU threads split among the seeds: oversubscribed intra-op threads spin-wait (10-100x slower steps)
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")
                        or str(max(1, (os.cpu_count() or 1) // len(args.seeds)))}
    procs = {seed: subprocess.Popen([sys.executable, __file__, "--stage", "grpo-seed", "--seeds", str(seed), *common],
                                    env=env)
             for seed in args.seeds}
    failed = [seed for seed, proc in procs.items() if proc.wait() != 0]
    if failed:
        raise SystemExit(f"GRPO failed for seeds {failed} (their output is above)")
    return {seed: json.loads((work / f"grpo-seed{seed}-run.json").read_text()) for seed in args.seeds}


def stage_grpo(args, work: Path, out: Path, init: Path) -> dict:
    t0 = time.perf_counter()
    sft_scores = held_out(init, args)
    print("sft held-out:", {k: v["accuracy"] for k, v in sft_scores.items() if isinstance(v, dict)}, flush=True)
    if args.parallel:
        runs = run_seeds_in_parallel(args, work, init)
    else:
        runs = {seed: run_seed(args, work, init, seed, seed_time_limit(args, STARTED, len(args.seeds) - k))
                for k, seed in enumerate(args.seeds)}
    tar_dir(Path(runs[args.seeds[0]]["model_dir"]), out / "default-model.tar")
    curves = {}
    for seed, run in runs.items():
        steps = [r for r in run["log"] if "accuracy" in r]
        curves[f"seed {seed}: train accuracy"] = [(r["step"], r["accuracy"]) for r in steps]
        evals = [r for r in run["log"] if "eval/mean" in r]
        curves[f"seed {seed}: held-out mean"] = [(r["step"], r["eval/mean"]) for r in evals]
    (out / "grpo-curve.svg").write_text(svg_curves(curves, title="GRPO: accuracy on rollouts and held out"))
    result = {"env": env(), "init": str(args.init), "parallel": args.parallel, "sft_held_out": sft_scores,
              "runs": runs, "summary": summarize(sft_scores, runs), "total_s": time.perf_counter() - t0}
    write_json(out / "grpo-metrics.json", result)
    return result


def stage_eval(args, work: Path, out: Path) -> dict:
    result = {"env": env(), "models": {}}
    for m in args.models:
        result["models"][m] = held_out(model_from(m, work), args, samples=args.samples)
    write_json(out / "eval-metrics.json", result)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", required=True, choices=["sft", "grpo", "eval", "all", "grpo-seed"],
                    help="grpo-seed: one seed of --stage grpo --parallel (internal)")
    ap.add_argument("--out", required=True, help="directory for the stage's files")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="sft: seconds of training to fit the steps into; grpo: time limit per seed (0: none)")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="grpo: finish within this many seconds of the start: the seeds share what is left")
    ap.add_argument("--reserve-s", type=float, default=45.0,
                    help="grpo with --deadline-s: seconds kept per seed for start-up, export and held-out eval")
    ap.add_argument("--init", default=None, help="grpo: the SFT model (directory or tar)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--parallel", action="store_true", help="grpo: run the seeds at once, one process each")
    ap.add_argument("--models", nargs="+", default=[], help="eval: model directories or tars")
    ap.add_argument("--samples", type=int, default=1, help="eval: also pass@samples at temperature 1")
    ap.add_argument("--eval-examples", type=int, default=300, help="held-out problems per task")
    ap.add_argument("--eval-max-tokens", type=int, default=256)
    ap.add_argument("--sft-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--grpo-set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--smoke", action="store_true", help="toy scale: a CPU check of the whole pipeline")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    if args.smoke:
        args.eval_examples = min(args.eval_examples, 8)
        args.eval_max_tokens = min(args.eval_max_tokens, 48)
        args.seeds = args.seeds[:2]
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.stage == "sft":
            stage_sft(args, work, out)
        elif args.stage == "grpo":
            if not args.init:
                raise SystemExit("--stage grpo needs --init (the SFT model directory or tar)")
            stage_grpo(args, work, out, model_from(args.init, work))
        elif args.stage == "eval":
            stage_eval(args, work, out)
        elif args.stage == "grpo-seed":
            (seed,) = args.seeds
            run = run_seed(args, work, Path(args.init), seed, args.budget_s)
            (work / f"grpo-seed{seed}-run.json").write_text(json.dumps(run))
        else:
            init = stage_sft(args, work, out)
            args.init = str(init)
            stage_grpo(args, work, out, init)
        print(f"stage {args.stage}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
