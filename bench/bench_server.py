"""Benchmark a running OpenAI-compatible server (`mixr serve`) with many concurrent streaming clients.

    mixr serve /path/to/model --port 8000 --max-queue 1024 &
    python bench/bench_server.py http://127.0.0.1:8000 --num-requests 1024 --concurrency 256 \\
        --input-len 512 --output-len 128 --out bench/results/server-....json

Every request is a streaming /v1/completions call whose prompt is --input-len random token ids (distinct per
request, so the prefix cache does not help unless --shared-prefix is given), with ignore_eos so that it generates
exactly --output-len tokens; --endpoint chat sends a chat message of random words instead. At most --concurrency
requests are open at once. Reports requests/s, output tokens/s, and percentiles of time to first token (TTFT),
inter-token latency (ITL: the gaps between streamed chunks), time per output token after the first (TPOT) and
end-to-end latency, as JSON on stdout (and in --out).

The client measures itself: a Python process reads only so many chunks a second (about 10k on a slow core with
httpx), so `client_busy_max` reports the busiest client process's CPU time over the run, with a warning near 1;
--procs N spreads the requests and the concurrency over N processes (their results merged) to measure faster
servers. Run against the same server twice with the same --seed, the second run's prompts come from the prefix
cache (`cached_tokens`; a warning says so): give each run its own --seed.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import ssl
import time
from queue import Empty

import httpx
from report import emit


def percentiles(values: list[float]) -> dict:
    """mean and p50/p90/p99/max of values (ms), by linear interpolation between order statistics."""
    if not values:
        return {}
    v = sorted(values)

    def q(p: float) -> float:
        x = p * (len(v) - 1)
        lo = int(x)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (x - lo)

    return {"mean": sum(v) / len(v), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": v[-1], "n": len(v)}


def make_prompts(args) -> list:
    rng = random.Random(args.seed)
    shared = [rng.randrange(args.min_token_id, args.max_token_id) for _ in range(args.shared_prefix)]
    words = ["apple", "book", "cat", "dog", "egg", "flower", "game", "house", "key", "lamp", "seven", "twelve"]
    prompts = []
    for _ in range(args.warmup + args.num_requests):
        n = args.input_len - len(shared)
        if args.endpoint == "chat":
            prompts.append(" ".join(rng.choice(words) for _ in range(n)))
        else:
            prompts.append(shared + [rng.randrange(args.min_token_id, args.max_token_id) for _ in range(n)])
    return prompts


async def one(client: httpx.AsyncClient, args, model: str, prompt) -> dict:
    """One streaming request: chunk arrival times and the usage the server reports."""
    body = {"model": model, "max_tokens": args.output_len, "temperature": args.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": not args.no_ignore_eos}
    if args.endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    start = time.perf_counter()
    chunks, usage, finish = [], None, None

    def failed(error: str) -> dict:
        return {"error": error, "start": start, "end": time.perf_counter()}

    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return failed(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
            # Events end at a blank line and lines at \n (or \r\n): split the bytes there, not with str.splitlines,
            # which also breaks at U+2028 or U+0085 inside the JSON text.
            buf = b""
            async for data in r.aiter_bytes():
                buf += data.replace(b"\r\n", b"\n") if b"\r" in data else data
                *events, buf = buf.split(b"\n\n")
                now = time.perf_counter()
                for raw in events:
                    if not raw.startswith(b"data: ") or raw == b"data: [DONE]":
                        continue
                    event = json.loads(raw[6:])
                    if "error" in event:
                        return failed(event["error"].get("message", str(event["error"])))
                    if event.get("usage"):
                        usage = event["usage"]
                    for c in event.get("choices") or []:
                        piece = c.get("text") if args.endpoint != "chat" else \
                            (c["delta"].get("content") or "") + (c["delta"].get("reasoning_content") or "")
                        if piece:
                            chunks.append(now)
                        finish = c.get("finish_reason") or finish
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return failed(f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if not chunks or usage is None:
        return failed(f"stream ended without {'tokens' if not chunks else 'usage'} (finish_reason {finish})")
    n = usage["completion_tokens"]
    return {"start": start, "end": end, "ttft": chunks[0] - start, "itl": [b - a for a, b in zip(chunks, chunks[1:])],
            "tpot": (end - chunks[0]) / (n - 1) if n > 1 else None, "output_tokens": n, "chunks": len(chunks),
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


def make_client(args, connections: int, ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, limits=limits,
                             timeout=httpx.Timeout(args.timeout, connect=30), verify=ssl_context or True)


async def drive(args, model: str, prompts: list, concurrency: int) -> list[dict]:
    """Send prompts with at most `concurrency` requests open: `concurrency` slots, each with its own client and
    keep-alive connection, taking the next prompt when its request ends. One shared client would scan all of
    its pool's connections (polling each socket) on every request start and end: at 256 connections that costs
    the client more than reading the streams."""
    todo = iter(prompts)
    context = httpx.create_ssl_context()  # one for all: each client would build its own (~30 ms each)

    async def slot() -> list[dict]:
        done = []
        async with make_client(args, 1, context) as client:
            for p in todo:
                done.append(await one(client, args, model, p))
        return done

    slots = await asyncio.gather(*(slot() for _ in range(min(concurrency, len(prompts)))))
    return [r for s in slots for r in s]


def _child(args, model: str, prompts: list, concurrency: int, barrier, results) -> None:
    """One client process: wait for the others, drive its share, send back (results, CPU seconds)."""
    barrier.wait()
    cpu = time.process_time()
    out = asyncio.run(drive(args, model, prompts, concurrency))
    results.put((out, time.process_time() - cpu))


async def prepare(args) -> tuple[str, list]:
    """The model name, and the prompts after the warmup requests (sent one by one)."""
    async with make_client(args, 1) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = make_prompts(args)
        for p in prompts[:args.warmup]:  # first-time costs (allocations, compilation) out of the measurement
            await one(client, args, model, p)
    return model, prompts[args.warmup:]


def run(args) -> dict:
    model, prompts = asyncio.run(prepare(args))
    procs = min(args.procs, args.concurrency, len(prompts))
    if procs == 1:
        cpu = time.process_time()
        results = asyncio.run(drive(args, model, prompts, args.concurrency))
        cpus = [time.process_time() - cpu]
    else:
        # Each process gets every procs-th prompt and its share of the concurrency. perf_counter is the
        # system-wide monotonic clock (Linux: CLOCK_MONOTONIC), so the processes' timestamps compare.
        ctx = mp.get_context("spawn")
        barrier, queue = ctx.Barrier(procs), ctx.Queue()
        shares = [args.concurrency // procs + (k < args.concurrency % procs) for k in range(procs)]
        children = [ctx.Process(target=_child, args=(args, model, prompts[k::procs], shares[k], barrier, queue),
                                daemon=True) for k in range(procs)]
        for c in children:
            c.start()
        results, cpus = [], []
        while len(cpus) < procs:
            try:
                out, cpu = queue.get(timeout=1.0)
            except Empty:
                if failed := [k for k, c in enumerate(children) if c.exitcode not in (None, 0)]:
                    raise SystemExit(f"client process {failed[0]} failed (exit code {children[failed[0]].exitcode})")
                continue
            results += out
            cpus.append(cpu)
        for c in children:
            c.join()
    return summarize(args, model, results, procs, cpus)


def summarize(args, model: str, results: list[dict], procs: int, cpus: list[float]) -> dict:
    duration = max(r["end"] for r in results) - min(r["start"] for r in results)
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    out_tokens = sum(r["output_tokens"] for r in ok)
    chunks = sum(r["chunks"] for r in ok)
    ms = 1000.0
    # Each client process is one Python thread: near 1.0 it, not the server, sets the pace (raise --procs).
    busy = max(cpus) / duration
    result = {
        "url": args.url, "model": model, "endpoint": args.endpoint, "num_requests": args.num_requests,
        "concurrency": args.concurrency, "input_len": args.input_len, "output_len": args.output_len,
        "shared_prefix": args.shared_prefix, "temperature": args.temperature, "ignore_eos": not args.no_ignore_eos,
        "completed": len(ok), "failed": len(errors), "duration_s": duration,
        "requests_per_s": len(ok) / duration, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration,
        "prompt_tokens": sum(r["prompt_tokens"] for r in ok), "cached_tokens": sum(r["cached_tokens"] for r in ok),
        "ttft_ms": percentiles([r["ttft"] * ms for r in ok]),
        "itl_ms": percentiles([x * ms for r in ok for x in r["itl"]]),
        "tpot_ms": percentiles([r["tpot"] * ms for r in ok if r["tpot"] is not None]),
        "e2e_ms": percentiles([(r["end"] - r["start"]) * ms for r in ok]),
        "chunks": chunks, "tokens_per_chunk": out_tokens / chunks if chunks else None,
        "client_procs": procs, "client_cpu_s": sum(cpus), "client_busy_max": busy,
        "errors": errors[:10],
    }
    warnings = []
    if busy > 0.8:
        warnings.append(f"a client process was busy {busy:.0%} of the run: the client may be what limits these "
                        "numbers; rerun with more --procs")
    if args.endpoint == "completions" and result["cached_tokens"] > args.shared_prefix * len(ok):
        warnings.append("the prefix cache served prompt tokens beyond --shared-prefix: a previous run with the same "
                        "--seed? Give each run its own --seed")
    if warnings:
        result["warnings"] = warnings
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name (default: the first one /v1/models lists)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=64, help="requests open at once")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (words, for --endpoint chat)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--shared-prefix", type=int, default=0, help="leading prompt tokens all requests share")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at eos (lengths then vary)")
    p.add_argument("--min-token-id", type=int, default=10)
    p.add_argument("--max-token-id", type=int, default=500, help="prompt ids are drawn from [min, max)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent one by one before the measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--api-key", default=None)
    p.add_argument("--procs", type=int, default=1,
                   help="client processes sharing the requests and the concurrency (one Python process reads "
                        "~10k chunks/s: use several past that; see client_busy_max)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.procs < 1:
        p.error("--procs must be >= 1")
    if not 0 <= args.shared_prefix < args.input_len:
        p.error("--shared-prefix must be in [0, --input-len)")
    result = run(args)
    emit(result, args.out)


if __name__ == "__main__":
    main()
