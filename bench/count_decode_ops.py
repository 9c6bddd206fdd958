"""Count the GPU kernels one engine decode step launches, per decoder layer, without a GPU.

Batch-1 decode runs in a CUDA graph whose time is mostly one short kernel after another, so the number of
kernels per layer is the proxy this script measures. It runs the engine's decode forward (`ModelRunner.
_decode_logits`, what the graph captures) on the CPU in bf16 on tiny random DeepSeek-V3/V2 models and counts the
aten ops that reach the dispatcher, less those that launch nothing (views, empty allocations). The Triton kernels
cannot run here; each is replaced by its PyTorch reference run uncounted and charged the launches it makes on a
GPU, so the count is the one the CUDA path would have:
  fused_moe: 2 GEMV kernels (the shared expert and the sum over k inside them); paged_decode_attention: 2 (decode +
  split merge, batch 1 splits); mixr.kernels.norm / rope / router: the launches their wrappers make.

    PYTHONPATH=. python bench/count_decode_ops.py [--no-fused] [--out counts.json]

--no-fused counts the PyTorch path of mixr's own norm, rope and router kernels (what runs without Triton).

--device cuda (a GPU) measures instead of counting ops: on a DeepSeek-V2-Lite-shaped random bf16 model cut to a
few layers, the kernels one eager decode step launches (torch.profiler) and the time of one CUDA-graph replay of
the batch-1 decode step, with mixr's kernels and with their PyTorch path; the difference between two depths gives
the per-layer figures and a 27-layer projection. It first checks that both paths give the same logits.

    PYTHONPATH=. python bench/count_decode_ops.py --device cuda --out $OUT/decode_cuda.json
"""

import argparse
import collections
import contextlib
import importlib
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from report import emit

from mixr.engine.model_runner import ModelRunner
from mixr.engine.paged_cache import StepMeta
from mixr.engine.sequence import Sequence
from mixr.models import config_from_hf
from mixr.sampling import SamplingParams

BASE = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 256, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "moe_intermediate_size": 24, "first_k_dense_replace": 1,
        "n_shared_experts": 2, "num_experts_per_tok": 3, "rms_norm_eps": 1e-6}
MODELS = {
    # DeepSeek-V3's routing (sigmoid, correction bias, noaux_tc groups) and q_lora_rank
    "deepseek_v3": dict(BASE, model_type="deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2,
                        q_lora_rank=48, norm_topk_prob=True, routed_scaling_factor=2.5),
    # DeepSeek-V2-Lite's structure: no q_lora_rank, softmax greedy routing, YaRN
    "deepseek_v2_lite": dict(BASE, model_type="deepseek_v2", n_routed_experts=8, topk_method="greedy",
                             scoring_func="softmax", q_lora_rank=None, routed_scaling_factor=1.0,
                             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                           "mscale_all_dim": 0.707}),
}

# Ops that launch no kernel: allocations and metadata-only ops (views are found from their schema).
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
             "lift_fresh", "_unsafe_view", "_reshape_alias", "as_strided", "resize_", "promote_types", "result_type"}
HOST_SYNC = {"_local_scalar_dense", "item", "nonzero", "equal", "is_nonzero"}


def launches(func) -> int:
    name = func.overloadpacket.__name__
    return 0 if func.is_view or name in NO_KERNEL else 1


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching aten ops by the label of the module running them (a decoder layer or 'outside')."""

    def __init__(self):
        super().__init__()
        self.label = "outside"
        self.paused = False
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.syncs: collections.Counter = collections.Counter()

    def charge(self, name: str, n: int) -> None:
        self.ops[self.label][name] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            if name in HOST_SYNC:
                self.syncs[f"{self.label}:{name}"] += 1
            if launches(func):
                self.charge(name, 1)
        return func(*args, **(kwargs or {}))


def emulated(counter: KernelCounter, name: str, ref, kernels):
    """ref run uncounted, charged `kernels` (an int or a function of the arguments) launches."""
    def run(*args, **kwargs):
        counter.charge(f"triton:{name}", kernels(*args, **kwargs) if callable(kernels) else kernels)
        counter.paused = True
        try:
            return ref(*args, **kwargs)
        finally:
            counter.paused = False
    return run


def patch_kernels(counter: KernelCounter, fused: bool) -> list:
    """Route every Triton call site to its counted reference; returns (object, attr, old value) to undo."""
    # (mixr.kernels re-exports functions under the module names, so import the modules by path)
    attn_k = importlib.import_module("mixr.kernels.attention")
    moe_k = importlib.import_module("mixr.kernels.fused_moe")
    undo = []

    def setattr_(obj, attr, value):
        undo.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, value)

    def moe_launches(x, gate_up, down, ids, weights, shared=None):
        cfg = moe_k.moe_config(x.shape[0], x.shape[1], down.shape[2])
        if cfg["path"] == "gemv":
            return 2  # a shared expert (the MoE passes one only when it fits) runs inside the two GEMVs
        return 6 + (6 if shared is not None else 0)  # shared_mlp_ref: 3 linears, silu, mul, the add

    moe_layer = importlib.import_module("mixr.layers.moe")
    paged = importlib.import_module("mixr.engine.paged_cache")
    # fused_moe on a CPU is its reference (fused_moe_ref, + shared_mlp_ref for a shared expert)
    setattr_(moe_layer, "fused_moe", emulated(counter, "fused_moe", moe_k.fused_moe, moe_launches))
    setattr_(paged, "paged_decode_attention",
             emulated(counter, "paged_decode_attention", attn_k.paged_decode_attention_ref, 2))
    # mixr's own small kernels: each module chooses its path with `_use_triton` and launches through `_launch_*`,
    # each with a `_launch_*_ref` of the same signature; a launcher's `kernels` attribute says how many it makes.
    for mod_name in ("mixr.kernels.norm", "mixr.kernels.rope", "mixr.kernels.router"):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue  # an older tree without them
        if not hasattr(mod, "_use_triton"):
            continue
        setattr_(mod, "_use_triton", (lambda *a, **k: not torch.is_grad_enabled()) if fused else (lambda *a, **k: False))
        for attr in [a for a in dir(mod) if a.startswith("_launch_") and not a.endswith("_ref")]:
            launcher = getattr(mod, attr)
            ref = getattr(mod, attr + "_ref")
            setattr_(mod, attr, emulated(counter, attr[len("_launch_"):], ref, getattr(launcher, "kernels", 1)))
    return undo


def count_model(name: str, hf: dict, context: int, fused: bool) -> dict:
    torch.manual_seed(0)
    model = config_from_hf(dict(hf)).build()
    model.init_weights(std=0.5 / hf["hidden_size"] ** 0.5)
    model = model.to(torch.bfloat16).eval()
    runner = ModelRunner(model, block_size=16, max_model_len=256, max_num_seqs=1, max_num_batched_tokens=256,
                         kv_cache_bytes=64 << 20, cuda_graphs=False)
    seq = Sequence(0, torch.randint(3, hf["vocab_size"], (context,)).tolist(), SamplingParams())
    seq.block_table = list(range(-(-(context + 1) // 16)))
    runner.prefill([seq], [context])
    seq.num_computed_tokens = context
    seq.token_ids.append(7)
    (ids, pos, slots), tables, lens = runner._decode_inputs([seq], 1)
    meta = StepMeta(True, slots, tables, lens)

    counter = KernelCounter()
    hooks = []
    for i, layer in enumerate(model.model.layers):
        kind = "moe" if hasattr(layer.mlp, "experts") else "dense"
        hooks.append(layer.register_forward_pre_hook(lambda m, a, lbl=f"layer{i}:{kind}": setattr(counter, "label", lbl)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(counter, "label", "outside")))
    undo = patch_kernels(counter, fused)
    try:
        # A first step, then forgotten: one-time allocations (the router's arrival counters) happen in the
        # engine's warm-up, before its graph captures. no_grad, not inference_mode: under inference_mode
        # composite ops (linear, einsum, to, reshape) reach the mode whole, before they decompose into the
        # kernels they launch.
        with torch.no_grad(), counter:
            runner._decode_logits(ids, pos, meta)
        counter.ops.clear()
        counter.syncs.clear()
        with torch.no_grad(), counter:
            runner._decode_logits(ids, pos, meta)
    finally:
        for obj, attr, old in reversed(undo):
            setattr(obj, attr, old)
        for h in hooks:
            h.remove()
    per_layer = {lbl: {"kernels": sum(c.values()), "ops": dict(sorted(c.items()))} for lbl, c in counter.ops.items()}
    layers = [v["kernels"] for k, v in per_layer.items() if k != "outside"]
    return {"model": name, "fused": fused, "context": context, "layers": per_layer,
            "total_kernels": sum(v["kernels"] for v in per_layer.values()),
            "kernels_per_moe_layer": next((v["kernels"] for k, v in per_layer.items() if k.endswith(":moe")), None),
            "kernels_per_dense_layer": next((v["kernels"] for k, v in per_layer.items() if k.endswith(":dense")), None),
            "mean_kernels_per_layer": sum(layers) / len(layers), "host_syncs": dict(counter.syncs)}


@contextlib.contextmanager
def pytorch_path():
    """mixr's norm, rope and router wrappers take their PyTorch path, as without Triton."""
    mods = [importlib.import_module(f"mixr.kernels.{m}") for m in ("norm", "rope", "router")]
    old = [m._use_triton for m in mods]
    for m in mods:
        m._use_triton = lambda *a, **k: False
    try:
        yield
    finally:
        for m, f in zip(mods, old):
            m._use_triton = f


def cuda_kernels_per_step(runner, ids, pos, meta) -> tuple[int, float, dict]:
    """Kernels (and memcpy/memset) one eager decode step puts on the GPU: how many, their summed run time (us), and
    by name [count, run time (us)], longest first."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        runner._decode_logits(ids, pos, meta)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner._decode_logits(ids, pos, meta)
            torch.cuda.synchronize()
    by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA:
            by_name[e.name()[:160]][0] += 1
            by_name[e.name()[:160]][1] += e.duration_ns() / 1e3
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1][1])[:40])
    return sum(c for c, _ in by_name.values()), sum(t for _, t in by_name.values()), top


def cuda_measure(shape: str, depths: list[int], context: int, replays: int, quantization: str | None = None
                 ) -> dict:
    from bench_engine import SHAPES  # bench/ is on sys.path when this file runs as a script

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": shape, "context": context,
           "quantization": quantization, "depths": {}}
    for n in depths:
        hf = dict(SHAPES[shape], num_hidden_layers=n)
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("cuda"):
                model = config_from_hf(hf).build()
        finally:
            torch.set_default_dtype(torch.float32)
        model = model.to("cuda").eval()  # the rotary inv_freq buffer is made on the CPU
        model.init_weights(std=0.02)
        if quantization:
            from mixr.quant import quantize_model
            from mixr.quant.quantize import auto_group_size
            quantize_model(model, bits=int(quantization[3:]), group_size=auto_group_size(model))
        row = {}
        logits = {}
        prompt = torch.randint(1000, hf["vocab_size"] - 1000, (context,)).tolist()  # one prompt for both paths
        for fused in (True, False):
            with (contextlib.nullcontext() if fused else pytorch_path()):
                runner = ModelRunner(model, block_size=16, max_model_len=context + 64, max_num_seqs=1,
                                     max_num_batched_tokens=context + 64, kv_cache_bytes=256 << 20, cuda_graphs=True)
                seq = Sequence(0, prompt, SamplingParams())
                seq.block_table = list(range(-(-(context + 1) // 16)))
                runner.prefill([seq], [context])
                seq.num_computed_tokens = context
                seq.token_ids.append(1234)
                (ids, pos, slots), tables, lens = runner._decode_inputs([seq], 1)
                meta = StepMeta(True, slots, tables, lens)
                kernels, kernel_us, names = cuda_kernels_per_step(runner, ids, pos, meta)
                with torch.inference_mode():
                    logits[fused] = runner._decode_logits(ids, pos, meta).float()
                    graph_logits = runner.decode([seq]).float()  # fills the graph's inputs, replays once
                torch.cuda.synchronize()
                graph = runner.graphs[1]
                for _ in range(10):
                    graph.replay()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(replays):
                    graph.replay()
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t) / replays * 1e3
                row["fused" if fused else "pytorch"] = {
                    "kernels_per_step": kernels, "graph_replay_ms": ms, "eager_kernel_time_ms": kernel_us / 1e3,
                    "graph_vs_eager_max_abs_diff": (graph_logits - logits[fused]).abs().max().item(),
                    "kernels_by_name_count_us": names}
                del runner
                torch.cuda.empty_cache()
        diff = (logits[True] - logits[False]).abs().max().item()
        row["fused_vs_pytorch_logits_max_abs_diff"] = diff
        row["fused_vs_pytorch_logits_rel_diff"] = diff / logits[False].abs().max().item()
        row["same_argmax"] = bool(logits[True].argmax(-1).eq(logits[False].argmax(-1)).all())
        out["depths"][n] = row
        del model
        torch.cuda.empty_cache()
    lo, hi = min(depths), max(depths)
    full = SHAPES[shape]["num_hidden_layers"]
    for path in ("fused", "pytorch"):
        a, b = out["depths"][lo][path], out["depths"][hi][path]
        per_layer_k = (b["kernels_per_step"] - a["kernels_per_step"]) / (hi - lo)
        per_layer_ms = (b["graph_replay_ms"] - a["graph_replay_ms"]) / (hi - lo)
        busy_ms = (b["eager_kernel_time_ms"] - a["eager_kernel_time_ms"]) / (hi - lo)
        step_ms = a["graph_replay_ms"] + (full - lo) * per_layer_ms
        out[path] = {"kernels_per_moe_layer": per_layer_k, "ms_per_moe_layer": per_layer_ms,
                     "kernel_run_ms_per_moe_layer": busy_ms,
                     f"projected_kernels_per_step_{full}_layers": a["kernels_per_step"] + (full - lo) * per_layer_k,
                     f"projected_graph_ms_per_step_{full}_layers": step_ms,
                     "projected_graph_tok_per_s_batch1": 1e3 / step_ms}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-fused", action="store_true", help="count the PyTorch path of mixr's norm/rope/router")
    ap.add_argument("--context", type=int, default=None, help="cached tokens before the step (40 CPU, 512 CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--shape", default="v2-lite", help="--device cuda: a bench_engine.py shape")
    ap.add_argument("--depths", default="2,4", help="--device cuda: two or more layer counts to difference")
    ap.add_argument("--replays", type=int, default=200)
    ap.add_argument("--quantization", choices=("int8", "int4"), default=None,
                    help="--device cuda: quantize the model (round to nearest, the largest int4 group that fits) first")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device == "cuda":
        result = cuda_measure(args.shape, [int(d) for d in args.depths.split(",")], args.context or 512,
                              args.replays, args.quantization)
    else:
        result = {name: count_model(name, hf, args.context or 40, not args.no_fused) for name, hf in MODELS.items()}
    emit(result, args.out)


if __name__ == "__main__":
    main()
