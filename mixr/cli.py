"""The `mixr` command line: generate, chat, serve, train, quantize."""

import argparse
import sys

from mixr.checkpoint import CheckpointError
from mixr.engine.distributed import WorkerError


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16, float32")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter (peft format), merged on load")
    _engine_args(p)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="processes (GPUs cuda:0..N-1) the model is sharded over")
    p.add_argument("--parallel-experts", default="tp", choices=["tp", "ep"],
                   help="with N > 1, routed experts split by intermediate dim (tp) or as whole experts (ep)")
    p.add_argument("--parallel-attention", default="tp", choices=["tp", "dp"],
                   help="with N > 1, attention heads split (tp), or each rank the whole attention for sequences "
                        "of its own (dp, data-parallel attention; needs --parallel-experts ep)")
    p.add_argument("--load-format", default="safetensors", choices=["safetensors", "dummy"],
                   help="dummy: random weights of config.json's shape, no checkpoint read (benchmarks)")


def _params(args):
    from mixr.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed)


def _load(model_dir, args):
    from mixr.llm import LLM
    from mixr.tiny import default_model_dir
    return LLM(model_dir or default_model_dir(), device=None, dtype=None, adapter=args.adapter,
               tensor_parallel_size=args.tensor_parallel_size, parallel_experts=args.parallel_experts,
               parallel_attention=args.parallel_attention, load_format=args.load_format)


def cmd_generate(args) -> None:
    if len(args.args) == 1:
        model_dir, prompt = None, args.args[0]
    else:
        model_dir, prompt = args.args
    llm = _load(model_dir, args)
    params = _params(args)
    for piece in llm.stream(prompt, params):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args) -> None:
    llm = _load(args.model, args)
    params = _params(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("mixr chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        prompt = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        reply = []
        try:
            for piece in llm.stream(prompt, params):
                reply.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            pass
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_watermark_detect(args) -> None:
    import contextlib
    import dataclasses
    import json
    import os

    from mixr.safety.watermark import detect
    from mixr.tiny import default_model_dir
    from mixr.tokenizer import Tokenizer
    src = args.text  # os.path.isfile, unlike Path.is_file, is False (no error) for a text too long for a path
    text = sys.stdin.read() if src == "-" else open(src, encoding="utf-8").read() if os.path.isfile(src) else src
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON only
        tokenizer = Tokenizer.from_dir(args.tokenizer or default_model_dir())
    d = detect(text, tokenizer, args.key, gamma=args.gamma, context_width=args.context_width,
               hashing=args.hashing, threshold=args.threshold)
    print(json.dumps(dataclasses.asdict(d)))


def _safety_config(args):
    """--safety-config, with --audit-log and --watermark-key (or $MIXR_WATERMARK_KEY) over it; None: all off."""
    import dataclasses
    import os

    from mixr.safety import SafetyConfig, WatermarkConfig
    key = args.watermark_key or os.environ.get("MIXR_WATERMARK_KEY") or None
    if not (args.safety_config or args.audit_log or key):
        return None
    cfg = SafetyConfig.from_file(args.safety_config) if args.safety_config else SafetyConfig()
    if args.audit_log:
        cfg.audit.log_path = args.audit_log
    if key:
        cfg.watermark = dataclasses.replace(cfg.watermark, key=key) if cfg.watermark else WatermarkConfig(key)
    return cfg


def cmd_serve(args) -> None:
    import os
    from pathlib import Path

    from mixr.engine.async_engine import AsyncLLM
    from mixr.engine.llm_engine import EngineConfig, LLMEngine
    from mixr.serve import serve
    from mixr.tiny import default_model_dir

    safety = _safety_config(args)  # first: a classifier model's memory is taken before the KV cache is sized
    model_dir = Path(args.model) if args.model else default_model_dir()
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          gpu_memory_utilization=args.gpu_memory_utilization, adapter=args.adapter,
                          tensor_parallel_size=args.tensor_parallel_size, parallel_experts=args.parallel_experts,
                          parallel_attention=args.parallel_attention, load_format=args.load_format)
    engine = LLMEngine(model_dir, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                       config=config)
    name = args.served_model_name or model_dir.resolve().name
    try:
        serve(AsyncLLM(engine), name, host=args.host, port=args.port,
              api_key=args.api_key or os.environ.get("MIXR_API_KEY") or None, max_queue=args.max_queue,
              shutdown_timeout=args.shutdown_timeout, safety=safety)
    finally:
        engine.close()


def cmd_train(args) -> None:
    from mixr.train.config import load_config
    from mixr.train.dpo import train_dpo
    from mixr.train.lora import train_lora
    from mixr.train.sft import train
    if args.mode == "grpo":  # its own settings class: mixr.train.config.GRPOConfig
        from mixr.train.config import GRPOConfig
        from mixr.train.grpo import train_grpo
        train_grpo(load_config(args.config, GRPOConfig,
                               **({"resume_from": args.resume_from} if args.resume_from else {})))
        return
    overrides = {"mode": args.mode}
    if args.resume_from:
        overrides["resume_from"] = args.resume_from
    {"lora": train_lora, "dpo": train_dpo}.get(args.mode, train)(load_config(args.config, **overrides))


def cmd_quantize(args) -> None:
    import json

    from mixr.quant.convert import quantize_checkpoint
    summary = quantize_checkpoint(args.model, args.out, bits=args.bits, group_size=args.group_size,
                                  method=args.method, zero_point=args.zero_point, calib=args.calib,
                                  device=args.device, progress=not args.quiet)
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mixr", description="Run DeepSeek-style MoE models.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt", usage="mixr generate [MODEL_DIR] PROMPT [options]")
    g.add_argument("args", nargs="+", metavar="[MODEL_DIR] PROMPT")
    _sampling_args(g, temperature=0.0)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="chat in the terminal, streaming the reply")
    c.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR")
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c, temperature=0.6)
    c.set_defaults(func=cmd_chat)
    s = sub.add_parser("serve", help="serve the OpenAI API (/v1/chat/completions, /v1/completions) over HTTP")
    s.add_argument("model", nargs="?", default=None, metavar="MODEL_DIR")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on /v1 (default: $MIXR_API_KEY)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests held at once (waiting + running); past it new ones get 429")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: the directory's)")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    s.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16, float32")
    s.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together")
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    s.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter (peft format), merged on load")
    _engine_args(s)
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM before they are aborted")
    s.add_argument("--safety-config", default=None, metavar="FILE",
                   help="input/output filters, audit and watermark: a .toml, .yaml or .json mixr.safety.SafetyConfig")
    s.add_argument("--audit-log", default=None, metavar="PATH", help="append a JSONL audit line per request")
    s.add_argument("--watermark-key", default=None, metavar="KEY",
                   help="watermark every output with this key (default: $MIXR_WATERMARK_KEY)")
    s.set_defaults(func=cmd_serve)
    w = sub.add_parser("watermark", help="text watermark tools").add_subparsers(dest="action", required=True)
    d = w.add_parser("detect", help="score a text for the green-list watermark; prints JSON")
    d.add_argument("text", metavar="TEXT_OR_FILE", help="the text, a file holding it, or - for stdin")
    d.add_argument("--key", required=True)
    d.add_argument("--model-dir", "--tokenizer", dest="tokenizer", default=None,
                   help="directory with tokenizer.json (default: the built-in model's)")
    d.add_argument("--gamma", type=float, default=0.25)
    d.add_argument("--threshold", type=float, default=4.0, help="z-score above which the verdict is watermarked")
    d.add_argument("--context-width", type=int, default=1)
    d.add_argument("--hashing", default="lefthash", choices=["lefthash", "minhash", "selfhash"])
    d.set_defaults(func=cmd_watermark_detect)
    t = sub.add_parser("train", help="train a model (pretrain, SFT, LoRA, DPO) from a YAML or TOML config")
    t.add_argument("mode", choices=["pretrain", "sft", "lora", "dpo", "grpo"],
                   help="pretrain: loss on every token; sft: on completions; lora: sft of LoRA adapters; "
                        "dpo: preference pairs; grpo: RL on the task suite (GRPOConfig keys)")
    t.add_argument("--config", required=True, help="a .yaml/.yml/.toml file of mixr.train.config.TrainConfig keys")
    t.add_argument("--resume-from", default=None, help="a checkpoint-<step>/ directory of an earlier run")
    t.set_defaults(func=cmd_train)
    q = sub.add_parser("quantize", help="write an int8 / int4 weight-quantized copy of a checkpoint")
    q.add_argument("model", metavar="MODEL_DIR")
    q.add_argument("out", metavar="OUT_DIR")
    q.add_argument("--bits", type=int, default=4, help="4 (group-wise) or 8 (per-channel)")
    q.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 or 128 (default 128)")
    q.add_argument("--zero-point", action="store_true", help="int4 with a per-group zero point (default symmetric)")
    q.add_argument("--method", default="rtn", help="rtn (round to nearest) or gptq (calibrated)")
    q.add_argument("--calib", default=None, metavar="FILE.txt",
                   help="calibration text for gptq (default: built-in task-suite text)")
    q.add_argument("--device", default=None, help="where to quantize (default: cuda when available)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)
    args = parser.parse_args(argv)
    if args.command == "generate" and len(args.args) > 2:
        parser.error("generate takes [MODEL_DIR] PROMPT; quote the prompt")
    try:
        args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"mixr: error: {e}", file=sys.stderr)
        sys.exit(2)
    except WorkerError as e:  # a tensor-parallel rank failed (its traceback is in the message)
        print(f"mixr: error: {e}", file=sys.stderr)
        sys.exit(1)
