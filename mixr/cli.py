"""The `mixr` command line: generate, chat and serve."""

import argparse
import sys

from mixr.checkpoint import CheckpointError


def _sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16, float32")


def _params(args):
    from mixr.sampling import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed)


def _load(model_dir):
    from mixr.llm import LLM
    from mixr.tiny import default_model_dir
    return LLM(model_dir or default_model_dir(), device=None, dtype=None)


def cmd_generate(args) -> None:
    if len(args.args) == 1:
        model_dir, prompt = None, args.args[0]
    else:
        model_dir, prompt = args.args
    llm = _load(model_dir)
    params = _params(args)
    for piece in llm.stream(prompt, params):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args) -> None:
    llm = _load(args.model)
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


def cmd_serve(args) -> None:
    import os
    from pathlib import Path

    from mixr.engine.async_engine import AsyncLLM
    from mixr.engine.llm_engine import EngineConfig, LLMEngine
    from mixr.serve import serve
    from mixr.tiny import default_model_dir

    model_dir = Path(args.model) if args.model else default_model_dir()
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                          gpu_memory_utilization=args.gpu_memory_utilization)
    engine = LLMEngine(model_dir, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                       config=config)
    name = args.served_model_name or model_dir.resolve().name
    serve(AsyncLLM(engine), name, host=args.host, port=args.port,
          api_key=args.api_key or os.environ.get("MIXR_API_KEY") or None, max_queue=args.max_queue,
          shutdown_timeout=args.shutdown_timeout)


def cmd_train(args) -> None:
    from mixr.train.config import load_config
    from mixr.train.sft import train
    overrides = {"mode": args.mode}
    if args.resume_from:
        overrides["resume_from"] = args.resume_from
    train(load_config(args.config, **overrides))


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
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM before they are aborted")
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
    t = sub.add_parser("train", help="train a model (pretrain or SFT) from a YAML or TOML config")
    t.add_argument("mode", choices=["pretrain", "sft"], help="pretrain: loss on every token; sft: on completions")
    t.add_argument("--config", required=True, help="a .yaml/.yml/.toml file of mixr.train.config.TrainConfig keys")
    t.add_argument("--resume-from", default=None, help="a checkpoint-<step>/ directory of an earlier run")
    t.set_defaults(func=cmd_train)
    args = parser.parse_args(argv)
    if args.command == "generate" and len(args.args) > 2:
        parser.error("generate takes [MODEL_DIR] PROMPT; quote the prompt")
    try:
        args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"mixr: error: {e}", file=sys.stderr)
        sys.exit(2)
