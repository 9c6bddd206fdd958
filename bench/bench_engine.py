"""GPU benchmark of the engine on a random-weight DeepSeek-V2-Lite- or Qwen3-30B-A3B-shaped HF checkpoint.

One run measures, on the same card: its ceilings (device copy bandwidth, bf16 matmul rate), the peer
(HF transformers `generate` at its fastest settings, same checkpoint), and mixr (decode at batch 1/32/256,
prefill, a shared-prefix prefill, offline throughput, TTFT / inter-token latency percentiles, memory).
Prints JSON (and writes it to --out).

    PYTHONPATH=. python bench/bench_engine.py --model v2-lite --out results.json
"""

import argparse
import gc
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from report import emit, save

from mixr.checkpoint import save_model
from mixr.models import config_from_hf
from mixr.tiny_tokenizer import build_tokenizer

SHAPES = {
    # DeepSeek-V2-Lite's published config.json, as is
    "v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512,
        "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "topk_method": "greedy", "scoring_func": "softmax", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16"},
    # Qwen3-30B-A3B's published config.json; --layers may cut its depth to fit the disk
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    # Qwen3-235B-A22B's published config.json (94 layers: 470 GB in bf16; bench_parallel cuts the depth)
    "qwen3-235b-a22b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_hidden_layers": 94,
        "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "rope_theta": 1000000.0, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"},
    # DeepSeek-V3's published config.json without its quantization_config (weights in bf16: 1.3 TB at 61 layers)
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 8, "topk_group": 4,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"},
}


def sync() -> None:
    if torch.cuda.is_available():  # bench_parallel's --smoke runs on a CPU
        torch.cuda.synchronize()


def ceilings() -> dict:
    """The card's own limits: device-to-device copy (bytes read + written) and a large bf16 matmul."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync()
    t = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    sync()
    copy = 2 * n * 20 / (time.perf_counter() - t)
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        m @ m
    sync()
    t = time.perf_counter()
    for _ in range(20):
        m @ m
    sync()
    flops = 2 * 8192 ** 3 * 20 / (time.perf_counter() - t)
    return {"copy_bandwidth_GBps": copy / 1e9, "bf16_matmul_TFLOPs": flops / 1e12}


def cover_vocab(path: Path, vocab_size: int) -> None:
    """Give every id of the model's vocabulary a token (" t<id>") in the small BPE, so that a random model's
    output decodes to text: ids the BPE lacked decoded to nothing, and the server then streamed no chunks."""
    f = path / "tokenizer.json"
    tok = json.loads(f.read_text())
    taken = set(tok["model"]["vocab"].values()) | {a["id"] for a in tok["added_tokens"]}
    for i in range(vocab_size):
        if i not in taken:
            tok["model"]["vocab"]["\u0120t" + str(i)] = i  # \u0120 is byte-level BPE's space
    f.write_text(json.dumps(tok))


def make_checkpoint(shape: str, layers: int | None, path: Path, dummy: bool = False) -> dict:
    """A random-weight checkpoint of SHAPES[shape] (optionally cut to `layers`) with a small BPE tokenizer, or with
    dummy=True config.json and the tokenizer only, for load_format="dummy" (shapes too large to write)."""
    hf = dict(SHAPES[shape])
    if layers:
        hf["num_hidden_layers"] = layers
    t = time.perf_counter()
    if dummy:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        with torch.device("meta"):
            n_params = sum(p.numel() for p in config_from_hf(hf).build().parameters())
    else:
        torch.set_default_dtype(torch.bfloat16)  # build straight in bf16: a float32 V2-Lite would not fit
        try:
            with torch.device("cuda"):
                model = config_from_hf(hf).build()
        finally:
            torch.set_default_dtype(torch.float32)
        model.init_weights(std=0.02)
        save_model(model, path, max_shard_bytes=4 << 30)
        n_params = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        torch.cuda.empty_cache()
    build_tokenizer(path)
    cover_vocab(path, hf["vocab_size"])
    return {"config": hf, "params": n_params, "write_seconds": time.perf_counter() - t}


def active_bytes_per_token(model) -> int:
    """Weight bytes one decode token must read: everything but the embedding table (one row) and the
    unselected routed experts."""
    total = 0
    for name, p in model.named_parameters():
        b = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            b = p.shape[1] * p.element_size()
        elif ".experts." in name:
            opts = model.config
            k = getattr(opts, "num_experts_per_tok")
            b = b * k // p.shape[0]
        total += b
    return total


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token ids clear of the special tokens at either end of the vocabulary (small vocabularies too)."""
    g = torch.Generator().manual_seed(seed)
    margin = min(1000, vocab // 4)
    return torch.randint(margin, vocab - margin, (n, length), generator=g).tolist()


def decode_rates(llm, batches: list[int], prompt_len: int, new: int, vocab: int) -> dict:
    """Greedy decode of `new` tokens after random prompt_len-token prompts, once per batch size B:
    batch{B}_output_tok_per_s (wall time, prefill included), batch{B}_decode_tok_per_s_per_seq (each sequence's
    first token to its last, averaged) and batch{B}_ttft_ms_median. Warms up first with 1 and 4 prompts of that length: a 1 x prompt_len prefill
    compiles other Triton tile configs than 4 x prompt_len, and a compile inside a timed run is what it would time."""
    from mixr import SamplingParams
    for n in (1, 4):
        llm.generate(random_prompts(n, prompt_len, vocab, seed=99), SamplingParams(temperature=0, max_tokens=16))
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    out = {}
    for B in batches:
        ps = random_prompts(B, prompt_len, vocab, seed=1000 + B)
        sync()
        t = time.perf_counter()
        res = llm.generate(ps, greedy)
        dt = time.perf_counter() - t
        assert all(len(r.token_ids) == new for r in res)
        out[f"batch{B}_output_tok_per_s"] = B * new / dt
        out[f"batch{B}_decode_tok_per_s_per_seq"] = statistics.mean(
            (new - 1) / (r.metrics.finish_time - r.metrics.first_token_time) for r in res)
        out[f"batch{B}_ttft_ms_median"] = 1000 * statistics.median(r.metrics.time_to_first_token for r in res)
    return out


def pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {f"p{q}": xs[min(len(xs) - 1, int(q / 100 * len(xs)))] * 1e3 for q in (50, 90, 99)} | \
        {"mean": statistics.mean(xs) * 1e3}


def bench_hf(path: Path, vocab: int, prompt_len: int, new: int, batches: list[int], agree_prompts,
             device_map: str = "cuda") -> dict:
    """HF transformers' generate on the same checkpoint; device_map="auto" spreads the layers over every GPU
    (accelerate's pipeline, what transformers users run a model too large for one GPU with)."""
    from transformers import AutoModelForCausalLM
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map).eval()
    out = {"load_seconds": time.perf_counter() - t}
    try:
        model.set_experts_implementation("grouped_mm")
        out["experts_implementation"] = "grouped_mm"
    except Exception as e:  # older transformers
        out["experts_implementation"] = f"default ({type(e).__name__})"
    for B in batches:
        ids = torch.tensor(random_prompts(B, prompt_len, vocab, seed=B), device="cuda")
        for cache in ("static", "dynamic"):  # the static cache is the fast setting; fall back if it fails
            kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
            if cache == "static":
                kw["cache_implementation"] = "static"
            try:
                # warm-up at the timed length: the static cache's size is prompt + max_new_tokens, and a new size
                # recompiles transformers' auto-compiled forward (8 new tokens here once put ~70 s of compiling
                # inside the timed batch-1 run: 3.6 tok/s)
                model.generate(ids, max_new_tokens=new, **kw)
                sync()
                t = time.perf_counter()
                gen = model.generate(ids, max_new_tokens=new, **kw)
                sync()
                dt = time.perf_counter() - t
            except Exception as e:
                out[f"batch{B}_{cache}_cache_error"] = f"{type(e).__name__}: {e}"[:300]
                continue
            assert gen.shape[1] == prompt_len + new, gen.shape
            out[f"batch{B}_output_tok_per_s"] = B * new / dt
            out[f"batch{B}_cache"] = cache
            break
    agree = []
    for p, toks in agree_prompts:  # teacher-forced top-1 agreement on mixr's own greedy continuation
        seq = torch.tensor([p + toks], device="cuda")
        with torch.no_grad():
            pred = model(seq).logits[0, len(p) - 1:-1].argmax(-1).tolist()
        agree.append(sum(a == b for a, b in zip(pred, toks)) / len(toks))
    out["top1_agreement_with_mixr"] = statistics.mean(agree) if agree else None
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def bench_mixr(path: Path, vocab: int, prompt_len: int, new: int, offline_n: int) -> tuple[dict, list]:
    from mixr import LLM, SamplingParams
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    llm = LLM(path, device="cuda", dtype="bfloat16", max_model_len=4096, max_num_seqs=512,
              max_num_batched_tokens=8192)
    out = {"cold_start_seconds": time.perf_counter() - t, "kv_blocks": llm.engine.runner.num_blocks,
           "kv_bytes_per_token": llm.engine.runner.kv_bytes_per_token,
           "graph_batch_sizes": sorted(llm.engine.runner.graphs),
           "max_num_seqs": 512}
    out |= decode_rates(llm, [1, 32, 256], prompt_len, new, vocab)
    # prefill: fresh prompts so the prefix cache cannot help
    for i in range(2):
        p = random_prompts(1, 2048, vocab, seed=2000 + i)[0]
        sync()
        t = time.perf_counter()
        llm.generate(p, SamplingParams(temperature=0, max_tokens=1))
        out["prefill_2048_tok_per_s"] = 2048 / (time.perf_counter() - t)
    # a second request with the same 2048-token system prompt reuses its cached blocks
    for seed in (3000, 3001):  # the first round warms the kernels for these shapes; the second is reported
        system = random_prompts(1, 2048, vocab, seed=seed)[0]
        ttft = []
        for tail in ([11, 12, 13], [21, 22, 23]):
            r = llm.generate(system + tail, SamplingParams(temperature=0, max_tokens=1))[0]
            ttft.append((r.metrics.time_to_first_token, r.metrics.num_cached_tokens))
    out["shared_prefix_ttft_ms"] = {"first": ttft[0][0] * 1e3, "second": ttft[1][0] * 1e3,
                                    "second_cached_tokens": ttft[1][1]}
    # a short prompt (a chat turn) runs as decode rows inside the captured graphs
    short = []
    for seed in range(6000, 6006):  # the first warms up
        r = llm.generate(random_prompts(1, 12, vocab, seed=seed), SamplingParams(temperature=0, max_tokens=1))[0]
        short.append(r.metrics.time_to_first_token * 1e3)
    out["prompt_12_ttft_ms"] = statistics.median(short[1:])
    # offline throughput
    ps = random_prompts(offline_n, prompt_len, vocab, seed=4000)
    sync()
    t = time.perf_counter()
    res = llm.generate(ps, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    dt = time.perf_counter() - t
    out["offline"] = {"requests": offline_n, "prompt_len": prompt_len, "output_len": new, "seconds": dt,
                      "output_tok_per_s": offline_n * new / dt,
                      "ttft_ms": pct([r.metrics.time_to_first_token for r in res]),
                      "itl_ms": pct([r.metrics.inter_token_latency for r in res])}
    out["peak_gpu_memory_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    out["active_weight_bytes_per_token"] = active_bytes_per_token(llm.model)
    agree_prompts = [(p, r.token_ids) for p, r in zip(
        random_prompts(4, 32, vocab, seed=5000),
        llm.generate(random_prompts(4, 32, vocab, seed=5000), SamplingParams(temperature=0, max_tokens=64,
                                                                              ignore_eos=True)))]
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return out, agree_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(SHAPES), default="v2-lite")
    ap.add_argument("--layers", type=int, default=None, help="cut the depth (disk or memory limits)")
    ap.add_argument("--dir", default="/tmp/mixr-bench-ckpt")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--offline", type=int, default=1024)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    path = Path(args.dir)
    shutil.rmtree(path, ignore_errors=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
              "ceilings": ceilings()}
    result["checkpoint"] = make_checkpoint(args.model, args.layers, path)
    result["checkpoint"].pop("config")
    result["layers"] = args.layers or SHAPES[args.model]["num_hidden_layers"]
    vocab = SHAPES[args.model]["vocab_size"]
    result["mixr"], agree = bench_mixr(path, vocab, args.prompt_len, args.new_tokens, args.offline)
    m = result["mixr"]
    floor = m["active_weight_bytes_per_token"] / (result["ceilings"]["copy_bandwidth_GBps"] * 1e9)
    m["batch1_fraction_of_weight_read_roofline"] = m["batch1_decode_tok_per_s_per_seq"] * floor
    save(result, args.out)  # written now too, so a later stage that runs out of time loses nothing
    if not args.skip_hf:
        import transformers
        result["hf_transformers"] = {"version": transformers.__version__} | bench_hf(
            path, vocab, args.prompt_len, args.new_tokens, [1, 32], agree)
    emit(result, args.out)


if __name__ == "__main__":
    main()
