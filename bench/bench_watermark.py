"""Watermark detection rates and perplexity cost, on random-weight tiny models (CPU is fine).

For each model: N samples of T tokens at temperature 1.0 (one seed per sample), for each delta (0: no
watermark); each sample is scored on its token ids and on its text re-tokenized (what `mixr watermark detect`
sees). True-positive rate: z > threshold on watermarked samples; false-positive rate: z > threshold on
unwatermarked samples and on human-written passages (docstrings of the Python standard library, read with
`ast`: nothing downloaded, nothing imported). Perplexity is the model's own, without the watermark bias: the
engine returns the unbiased logprob of every sampled token.

Random weights give near-uniform next-token distributions (high entropy), which make the watermark easy to
plant and to detect; a trained model's lower entropy makes both harder. A model with larger random weights is
included as a lower-entropy case. No trained default model exists yet.

    PYTHONPATH=. python bench/bench_watermark.py --out bench/results/watermark-cpu-2026-11-23.json
"""

import argparse
import ast
import inspect
import json
import math
import platform
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from report import emit, save

from mixr import LLM, SamplingParams
from mixr.checkpoint import save_model
from mixr.models import config_from_hf
from mixr.safety import WatermarkConfig, audit_response, detect
from mixr.tiny import make_tiny_checkpoint
from mixr.tiny_tokenizer import BOS, EOS, build_tokenizer
from mixr.tokenizer import Tokenizer
from mixr.train.tasks import TASKS, generate

KEY = "bench-watermark-key"


def qwen3_moe_checkpoint(out: Path, std: float) -> Path:
    """A second family: a tiny random Qwen3-MoE (GQA, per-head Q/K norm, 8 experts) with the same tokenizer."""
    build_tokenizer(out)
    tok = Tokenizer.from_dir(out)
    hf = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": tok.vocab_size,
          "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 8,
          "num_experts_per_tok": 2, "norm_topk_prob": True, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 2048, "rope_theta": 10000.0,
          "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
          "bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS), "torch_dtype": "float32"}
    model = config_from_hf(hf).build()
    model.init_weights(std=std, generator=torch.Generator().manual_seed(1))
    save_model(model, out)
    (out / "config.json").write_text(json.dumps(hf))
    return out


def human_passages(tok: Tokenizer, n: int, tokens: int) -> list[str]:
    """Passages of >= `tokens` tokens made of whole paragraphs of stdlib docstrings, in file order."""
    out, cur, cur_len = [], [], 0
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree] + [x for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            for para in inspect.cleandoc(doc).split("\n\n") if doc else []:
                cur.append(para)
                cur_len += len(tok.encode(para, add_special_tokens=False))
                if cur_len >= tokens:
                    out.append("\n\n".join(cur))
                    cur, cur_len = [], 0
                    if len(out) == n:
                        return out
    return out


def summary(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "min": min(xs), "max": max(xs)}


def pairs_kept(ids: list[int], again: list[int]) -> float:
    before, after = set(zip(ids, ids[1:])), set(zip(again, again[1:]))
    return len(before & after) / max(1, len(before))


def rate(zs: list[float], threshold: float) -> float:
    return sum(z > threshold for z in zs) / len(zs)


def run_model(path: Path, deltas: list[float], n: int, tokens: int, threshold: float, batch: int,
              variants: list[dict], task: str | None = None) -> dict:
    llm = LLM(path, device="cpu", dtype="float32", max_num_seqs=batch)
    tok = llm.tokenizer
    res = {"model_type": llm.config.model_type, "vocab_size": llm.config.vocab_size, "by_delta": {}}
    prompts = [f"Sample {i}: " for i in range(n)]
    if task:  # a trained chat model: held-out problems of its task, in its chat template
        prompts = [tok.apply_chat_template([{"role": "user", "content": it.prompt}], add_generation_prompt=True,
                                           tokenize=True) for it in generate(TASKS[task], n, seed=0, split="test")]
    runs = [(f"delta={d}", WatermarkConfig(KEY, delta=d) if d else None) for d in deltas]
    runs += [(f"{v['hashing']} h={v['context_width']} delta={v['delta']}", WatermarkConfig(KEY, **v)) for v in variants]
    for name, wm in runs:
        t0 = time.perf_counter()
        params = [SamplingParams(temperature=1.0, max_tokens=tokens, seed=i, ignore_eos=True, logprobs=20,
                                 watermark=wm) for i in range(n)]
        outs = llm.generate(prompts, params)
        gen_s = time.perf_counter() - t0
        cfg = wm or WatermarkConfig(KEY)  # unwatermarked text is scored with the default detector
        z_ids = [detect(o.token_ids, config=cfg, threshold=threshold).z_score for o in outs]
        z_text = [detect(o.text, tok, config=cfg, threshold=threshold).z_score for o in outs]
        lps = [[lp[0] for lp in o.outputs[0].logprobs] for o in outs]
        ppl = [math.exp(-statistics.fmean(x)) for x in lps]
        ent = [audit_response(o.outputs[0].logprobs, o.token_ids).mean_entropy for o in outs]
        key = "rate_z_gt_threshold"
        if wm is None:  # the other detectors on unwatermarked text: their false-positive rates
            extra = {f"{key}_token_ids_{v['hashing']}_h{v['context_width']}": rate(
                [detect(o.token_ids, config=WatermarkConfig(KEY, **v)).z_score for o in outs], threshold)
                for v in variants}
        res["by_delta"][name] = {
            "watermarked": wm is not None, "samples": n, "tokens_per_sample": tokens,
            f"{key}_token_ids": rate(z_ids, threshold), f"{key}_text": rate(z_text, threshold),
            "z_token_ids": summary(z_ids), "z_text": summary(z_text),
            # random weights emit token sequences the BPE would split differently (and invalid UTF-8):
            # the share of scored (previous, token) pairs that survive decode + re-encode
            "retokenized_pairs_kept_fraction": statistics.fmean(
                pairs_kept(o.token_ids, tok.encode(o.text, add_special_tokens=False)) for o in outs),
            "perplexity_mean": statistics.fmean(ppl), "perplexity_median": statistics.median(ppl),
            "mean_nll_nats": -statistics.fmean(statistics.fmean(x) for x in lps),
            "entropy_nats_top20_lower_bound": statistics.fmean(ent),
            "generate_seconds": round(gen_s, 1),
            **(extra if wm is None else {}),
        }
        print(path.name, name, json.dumps({k: v for k, v in res["by_delta"][name].items()
                                           if k.startswith("rate") or k.startswith("perp")}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threshold", type=float, default=4.0)
    ap.add_argument("--deltas", default="0,1,2,4")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model", default=None, help="a trained model directory instead of the random models")
    ap.add_argument("--task", default="arithmetic", help="with --model: prompts from this task's held-out split")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    deltas = [float(d) for d in args.deltas.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    result = {
        "bench": "watermark", "date": "2026-11-23", "device": f"cpu ({platform.processor() or platform.machine()}, "
                                                              f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "note": ("RANDOM-WEIGHT models: no trained default model exists yet. Their high-entropy outputs make the "
                 "watermark easier to plant and to detect than on a trained model; the qwen3-moe std=0.5 model is "
                 "a lower-entropy random case. Detection on 'text' re-tokenizes the decoded output, as "
                 "`mixr watermark detect` does."),
        "settings": {"samples": args.samples, "tokens": args.tokens, "temperature": 1.0, "top_p": 1.0,
                     "gamma": 0.25, "hashing": "lefthash", "context_width": 1, "z_threshold": args.threshold,
                     "perplexity": "exp of the mean NLL of the sampled tokens under the model without the bias"},
        "models": {},
    }
    variants = [dict(delta=2.0, context_width=4, hashing="selfhash")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            models = {f"trained: {args.model} (prompts: {args.task} held-out)": Path(args.model)}
            result["note"] = ("A TRAINED model, prompted with its task's held-out problems; ignore_eos keeps it "
                              "sampling to the full length. Detection on 'text' re-tokenizes the decoded output.")
        else:
            models = {
                "tiny-deepseek-v3 (mixr.tiny, init std 0.1)": make_tiny_checkpoint(tmp / "deepseek-v3"),
                "tiny-qwen3-moe (init std 0.1)": qwen3_moe_checkpoint(tmp / "qwen3-moe-0.1", 0.1),
                "tiny-qwen3-moe (init std 0.5, lower entropy)": qwen3_moe_checkpoint(tmp / "qwen3-moe-0.5", 0.5),
            }
        for name, path in models.items():
            result["models"][name] = run_model(path, deltas, args.samples, args.tokens, args.threshold, args.batch,
                                               variants, args.task if args.model else None)
            save(result, args.out)  # write after each model, so a cut run keeps what it measured
        tok = Tokenizer.from_dir(next(iter(models.values())))
        passages = human_passages(tok, args.samples, args.tokens)
    cfg = WatermarkConfig(KEY)
    dets = [detect(p, tok, config=cfg, threshold=args.threshold) for p in passages]
    zs = [d.z_score for d in dets]
    result["human_text"] = {
        "source": "paragraphs of Python standard-library docstrings (ast.get_docstring over Lib/*.py), grouped "
                  f"into passages of >= {args.tokens} tokens of the tiny BPE tokenizer (shared by all models)",
        "passages": len(passages), "tokens_scored_mean": statistics.fmean(d.num_tokens_scored for d in dets),
        "rate_z_gt_threshold": rate(zs, args.threshold), "z": summary(zs),
        "selfhash_h4_rate_z_gt_threshold": rate(
            [detect(p, tok, config=WatermarkConfig(KEY, context_width=4, hashing="selfhash")).z_score
             for p in passages], args.threshold),
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
