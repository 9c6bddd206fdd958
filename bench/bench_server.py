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
"""

import argparse
import asyncio
import json
import random
import time

import httpx


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
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"].get("message", str(event["error"]))}
                if event.get("usage"):
                    usage = event["usage"]
                for c in event.get("choices") or []:
                    piece = c.get("text") if args.endpoint != "chat" else \
                        (c["delta"].get("content") or "") + (c["delta"].get("reasoning_content") or "")
                    if piece:
                        chunks.append(time.perf_counter())
                    finish = c.get("finish_reason") or finish
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    if not chunks or usage is None:
        return {"error": f"stream ended without {'tokens' if not chunks else 'usage'} (finish_reason {finish})"}
    n = usage["completion_tokens"]
    return {"start": start, "end": end, "ttft": chunks[0] - start, "itl": [b - a for a, b in zip(chunks, chunks[1:])],
            "tpot": (end - chunks[0]) / (n - 1) if n > 1 else None, "output_tokens": n,
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)}


async def run(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    timeout = httpx.Timeout(args.timeout, connect=30)
    async with httpx.AsyncClient(base_url=args.url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=timeout) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        prompts = make_prompts(args)
        warmup, prompts = prompts[:args.warmup], prompts[args.warmup:]
        for p in warmup:  # first-time costs (allocations, compilation) out of the measurement
            await one(client, args, model, p)
        sem = asyncio.Semaphore(args.concurrency)

        async def limited(p):
            async with sem:
                return await one(client, args, model, p)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        duration = time.perf_counter() - t0

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    out_tokens = sum(r["output_tokens"] for r in ok)
    ms = 1000.0
    return {
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
        "errors": errors[:10],
    }


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
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    if not 0 <= args.shared_prefix < args.input_len:
        p.error("--shared-prefix must be in [0, --input-len)")
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
