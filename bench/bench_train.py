"""Training throughput and MFU of a DeepSeek-V2-Lite-shaped layer stack on one GPU; checks first, then times;
writes and prints JSON.

    PYTHONPATH=. python bench/bench_train.py --out bench/results/train-v2lite-h100-DATE.json [--layers 4]
        [--batch 2 --seq 2048] [--steps 8] [--no-experts-bench]

Model: `--layers` DeepSeek-V2-Lite decoder layers, every one MoE (hidden 2048, 16 heads, MLA with kv_lora_rank 512
and no q_lora, qk 128 + 64 rope, v 128; 64 routed experts top-6 + 2 shared, moe_intermediate 1408; YaRN), with
V2-Lite's 102400-token embedding and LM head; random init (std 0.02), so routing is near-balanced. The step is what
`mixr train sft` runs: float32 master weights, bf16 autocast forward, next-token loss on B x L random tokens,
backward, gradient clipping, torch.optim.AdamW (its default foreach implementation).

Model FLOPs per step = 6 * active parameters * tokens + attention: active = every matmul parameter a token
touches (attention, router, 2 shared + 6 of 64 routed experts, LM head; not the embedding lookup), attention =
3 x the forward's QK^T and PV with a causal mask (half of the L x L square: 2 * heads * (d_qk + d_v) * L(L+1)/2
per sequence and layer). MFU is stated against the datasheet's dense bf16 peak (H100 / H200 SXM: 989.4 TFLOP/s)
and against the bf16 matmul rate measured in the same run (8192^3 matmuls, median of 20).

Checks before timing: the loss at init is ln(vocab) +- 0.5; every gradient is finite and some are non-zero; the
bf16-autocast logits match a float32 forward (relative error); the training path of the routed experts
(fused_moe_ref, autograd) matches the Triton fused_moe forward; the timed steps lower the loss on their batch.

Unless --no-experts-bench: the routed experts' training path against two candidates written here, not used by
mixr: the same loop over `unbind(0)` views (indexing `w[e]` in the loop makes autograd build one full-size
zero-filled gradient of the stack per expert and sum them) and torch's grouped GEMM (one bf16 cast of each stack,
tokens sorted by expert). Each candidate is checked against fused_moe_ref (output and gradients), then timed as
whole training steps (swapped in for the experts' path of this model) and alone, one layer's experts forward +
backward under bf16 autocast at the step's token count.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from report import emit

from mixr.kernels.fused_moe import fused_moe, fused_moe_ref
from mixr.models import config_from_hf
from mixr.train.losses import token_logprobs

DATASHEET_BF16 = {"H100": 989.4e12, "H200": 989.4e12}  # dense (no sparsity), SXM


def v2_lite_config(layers: int) -> dict:
    return {
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 0, "moe_layer_freq": 1, "topk_method": "greedy", "scoring_func": "softmax",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    }


def log(*a):
    print(*a, flush=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def cuda_time(fn, iters: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def matmul_rate(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(iters):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


def flops_per_step(model, cfg: dict, batch: int, seq: int) -> dict:
    routed = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj",
                                                                                "experts.down_proj")))
    embed = model.model.embed_tokens.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2) - embed
    active = matmul - routed + routed * cfg["num_experts_per_tok"] / cfg["n_routed_experts"]
    heads, d_qk, d_v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    attn_fwd = 2 * heads * (d_qk + d_v) * seq * (seq + 1) / 2 * batch * cfg["num_hidden_layers"]
    tokens = batch * seq
    return {"params_total": total, "params_active_matmul": int(active), "tokens": tokens,
            "dense_flops": 6 * active * tokens, "attention_flops": 3 * attn_fwd,
            "model_flops": 6 * active * tokens + 3 * attn_fwd}


# ---------------------------------------------------------------- routed experts: training path vs candidates

def moe_unbind(x, gate_up, down, ids, weights):
    """fused_moe_ref's loop over unbind(0) views: autograd then stacks the per-expert weight gradients once."""
    T, H = x.shape
    k = ids.shape[1]
    E = gate_up.shape[0]
    gu, dn = gate_up.unbind(0), down.unbind(0)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    flat = ids.flatten().long()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()
    w = weights.flatten()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tok = pairs // k
        gate, up = F.linear(x[tok], gu[e]).float().chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(x.dtype)
        out.index_add_(0, tok, F.linear(act, dn[e]).float() * w[pairs, None])
    return out.to(x.dtype)


def moe_grouped_mm(x, gate_up, down, ids, weights):
    """Tokens sorted by expert, both projections as one grouped bf16 GEMM each (torch's grouped_mm)."""
    T, H = x.shape
    k = ids.shape[1]
    E = gate_up.shape[0]
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    flat = ids.flatten().long()
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
    tok = order // k
    xs = x[tok].to(torch.bfloat16)  # (T*k, H)
    h = grouped_mm(xs, gate_up.to(torch.bfloat16).transpose(-2, -1), offs=offs)  # (T*k, 2I)
    gate, up = h.float().chunk(2, dim=-1)
    act = (F.silu(gate) * up).to(torch.bfloat16)
    y = grouped_mm(act, down.to(torch.bfloat16).transpose(-2, -1), offs=offs)  # (T*k, H)
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    out.index_add_(0, tok, y.float() * weights.flatten()[order, None])
    return out.to(x.dtype)


def experts_bench(tokens: int, cfg: dict, iters: int) -> dict:
    """One layer's routed experts, forward + backward under bf16 autocast, float32 master weights and input
    (as in the training step); routing from a random router (near-balanced)."""
    E, k, H, I = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    g = torch.Generator(device="cuda").manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, device="cuda", generator=g) * 0.02).requires_grad_()
    down = (torch.randn(E, H, I, device="cuda", generator=g) * 0.02).requires_grad_()
    x = torch.randn(tokens, H, device="cuda", generator=g).requires_grad_()
    scores = (torch.randn(tokens, E, device="cuda", generator=g)).softmax(-1)
    weights, ids = scores.topk(k, dim=-1)
    grad_out = torch.randn(tokens, H, device="cuda", generator=g)
    res = {"tokens": tokens}
    ref_out = ref_grads = None
    for name, fn in (("fused_moe_ref", fused_moe_ref), ("unbind_loop", moe_unbind), ("grouped_mm", moe_grouped_mm)):
        def step(fn=fn):
            for t in (gate_up, down, x):
                t.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(x, gate_up, down, ids, weights)
            out.float().backward(grad_out)
            return out
        try:
            out = step()
            grads = [t.grad.clone() for t in (gate_up, down, x)]
            if ref_out is None:
                ref_out, ref_grads = out.detach(), grads
            check = {"out_rel_err": rel_err(out, ref_out),
                     "grad_rel_err": max(rel_err(a, b) for a, b in zip(grads, ref_grads))}
            times = cuda_time(step, iters)
            res[name] = {"fwd_bwd_ms": 1e3 * statistics.median(times), **check}
            log(f"experts {name}: {res[name]}")
        except Exception as e:  # a candidate this torch cannot run is reported, not fatal
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"experts {name}: {res[name]['error']}")
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- the model step

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warmup steps)")
    ap.add_argument("--no-experts-bench", dest="experts_bench", action="store_false")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench_train needs a GPU"
    t_start = time.time()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    result = {"device": name, "torch": torch.__version__, "layers": args.layers, "batch": args.batch,
              "seq": args.seq, "datasheet_bf16_flops": peak}

    log("measuring the bf16 matmul rate ...")
    result["measured_bf16_matmul_flops"] = measured = matmul_rate()
    log(f"  {measured / 1e12:.1f} TFLOP/s")

    cfg = v2_lite_config(args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = config_from_hf(cfg).build()
    model.cuda()  # the rotary frequencies are made on the CPU
    model.init_weights(std=0.02)
    model.train()
    result |= flops_per_step(model, cfg, args.batch, args.seq)
    log(f"params {result['params_total'] / 1e9:.2f}B total, {result['params_active_matmul'] / 1e6:.0f}M active")

    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.seq), device="cuda", generator=g)
    checks = {}

    # checks: autocast vs float32 forward, the experts' training path vs the kernel, loss and gradients at init
    with torch.no_grad():
        short = ids[:1, :256]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lo_bf16 = model(short)
        checks["logits_bf16_vs_fp32_rel_err"] = rel_err(lo_bf16, model(short))
    experts = model.model.layers[0].mlp.experts
    xs = torch.randn(512, cfg["hidden_size"], device="cuda", generator=g, dtype=torch.bfloat16)
    w, top = torch.randn(512, cfg["n_routed_experts"], device="cuda", generator=g).softmax(-1).topk(6, dim=-1)
    with torch.no_grad():
        gu, dn = experts.gate_up_proj.bfloat16(), experts.down_proj.bfloat16()
        checks["experts_ref_vs_kernel_rel_err"] = rel_err(fused_moe_ref(xs, gu, dn, top, w),
                                                          fused_moe(xs, gu, dn, top, w))
    del gu, dn
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=3e-4, betas=(0.9, 0.95))

    def forward_loss():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids)
        return -token_logprobs(logits[:, :-1], ids[:, 1:]).mean()

    def step():
        loss = forward_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    loss = forward_loss()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    checks["loss_at_init"] = loss.item()
    checks["ln_vocab"] = math.log(cfg["vocab_size"])
    checks["grads_finite"] = all(torch.isfinite(gr).all().item() for gr in grads)
    checks["params_with_grad"] = f"{sum(gr.abs().sum().item() > 0 for gr in grads)}/{len(list(model.parameters()))}"
    optimizer.zero_grad(set_to_none=True)
    del loss, grads
    result["checks"] = checks
    log(f"checks: {checks}")
    ok = (abs(checks["loss_at_init"] - checks["ln_vocab"]) < 0.5 and checks["grads_finite"]
          and checks["logits_bf16_vs_fp32_rel_err"] < 5e-2 and checks["experts_ref_vs_kernel_rel_err"] < 1e-2)

    # timing: whole steps, then one step split into phases
    torch.cuda.reset_peak_memory_stats()
    losses = []
    times = cuda_time(lambda: losses.append(step().item()), args.steps)
    result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    result["loss_first_last"] = [losses[0], losses[-1]]
    ok = ok and losses[-1] < losses[0]
    phases = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = forward_loss()
    torch.cuda.synchronize()
    phases["forward_s"] = (t1 := time.perf_counter()) - t0
    loss.backward()
    torch.cuda.synchronize()
    phases["backward_s"] = (t2 := time.perf_counter()) - t1
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    phases["clip_and_adamw_s"] = time.perf_counter() - t2
    del loss

    step_s = statistics.median(times)
    achieved = result["model_flops"] / step_s
    result |= {"step_s": step_s, "step_s_all": times, "phases": phases,
               "tokens_per_s": result["tokens"] / step_s, "model_tflops_per_s": achieved / 1e12,
               "mfu_vs_datasheet": achieved / peak if peak else None, "mfu_vs_measured_matmul": achieved / measured,
               "checks_passed": ok}
    log(f"step {step_s:.3f}s  {result['tokens_per_s']:.0f} tok/s  {achieved / 1e12:.1f} TFLOP/s  "
        f"MFU {result['mfu_vs_datasheet'] or float('nan'):.3f} (datasheet) "
        f"{result['mfu_vs_measured_matmul']:.3f} (measured)  phases {phases}")

    if args.experts_bench:
        # the same steps with a candidate in place of the experts' training path (module global swapped here only)
        import mixr.layers.moe as moe_layer
        whole = {}
        for name, fn in (("unbind_loop", moe_unbind), ("grouped_mm", moe_grouped_mm)):
            moe_layer.fused_moe_ref = fn
            try:
                t = statistics.median(cuda_time(step, max(3, args.steps // 2), warmup=1))
                whole[name] = {"step_s": t, "tokens_per_s": result["tokens"] / t,
                               "mfu_vs_datasheet": result["model_flops"] / t / peak if peak else None,
                               "mfu_vs_measured_matmul": result["model_flops"] / t / measured}
            except Exception as e:  # a candidate this torch cannot run is reported, not fatal
                whole[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            finally:
                moe_layer.fused_moe_ref = fused_moe_ref
            optimizer.zero_grad(set_to_none=True)
            log(f"whole step with {name}: {whole[name]}")
        result["whole_step_with_candidates"] = whole
        del model, optimizer
        torch.cuda.empty_cache()
        eb = experts_bench(args.batch * args.seq, cfg, iters=5)
        if "fwd_bwd_ms" in eb.get("fused_moe_ref", {}):
            eb["share_of_step_all_layers"] = eb["fused_moe_ref"]["fwd_bwd_ms"] / 1e3 * args.layers / step_s
        result["experts_bench"] = eb
    result["wall_s"] = time.time() - t_start
    emit(result, args.out)


if __name__ == "__main__":
    main()
