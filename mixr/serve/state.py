"""The engine side of one HTTP request: admission, the shared state of the routes, reading the engine's
outputs, and closing the request (an abort) however the response ends."""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from json.encoder import encode_basestring  # C: a str as a JSON string literal, non-ASCII kept

from fastapi import Request
from fastapi.responses import StreamingResponse

from mixr.engine.async_engine import AsyncLLM
from mixr.engine.llm_engine import RequestOutput
from mixr.safety import SafetyConfig
from mixr.sampling import SamplingParams
from mixr.serve.metrics import ServerMetrics
from mixr.serve.protocol import APIError
from mixr.serve.safety import OutputGuard, ServerSafety

THINK_START, THINK_END = "<think>", "</think>"


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, char -> byte: printable bytes stand for themselves, the rest for
    chr(256 + k). Byte-level vocabularies (DeepSeek, Qwen, Llama 3) spell every token in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in chars]
    chars |= {b: chr(256 + k) for k, b in enumerate(rest)}
    return {c: b for b, c in chars.items()}


_BYTE_LEVEL = _byte_level_alphabet()


class ServerState:
    """What the routes share: the engine, the settings, the admission count and the metrics."""

    def __init__(self, llm: AsyncLLM, model_name: str, api_key: str | None, max_queue: int,
                 safety: SafetyConfig | None = None):
        self.llm, self.engine, self.tokenizer = llm, llm.engine, llm.engine.tokenizer
        self.model_name, self.api_key, self.max_queue = model_name, api_key, max_queue
        self.in_flight = 0  # admitted generation requests not yet finished: waiting + running in the engine
        self.metrics = ServerMetrics()
        self.safety = None if safety is None else ServerSafety(safety, self.tokenizer, [api_key or ""], self.metrics)
        self.created = int(time.time())
        self.reasoning = all(self.tokenizer.token_to_id(t) is not None for t in (THINK_START, THINK_END))
        self._pieces: dict[int, tuple[str, list[int]]] = {}

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def admit(self) -> None:
        # Counted here, released by Run.close: the bound covers every request the engine holds.
        if self.in_flight >= self.max_queue:
            raise APIError(429, f"The server is at capacity ({self.max_queue} requests in flight); retry shortly.",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.in_flight += 1

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and its bytes (a token may hold part of a UTF-8 character: the bytes are exact)."""
        if (p := self._pieces.get(token_id)) is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = text.encode()
            spelled = self.tokenizer.id_to_token(token_id)
            if spelled and all(c in _BYTE_LEVEL for c in spelled):
                b = bytes(_BYTE_LEVEL[c] for c in spelled)
                if b.decode("utf-8", "replace") == text:  # it really is a byte-level token
                    raw = b
            p = self._pieces[token_id] = (text, list(raw))
        return p

    def prompt_ids(self, ids: list[int], param: str) -> list[int]:
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but {len(ids)} tokens "
                           f"were given in the {param} (at least one must be left for the completion).", param=param,
                           code="context_length_exceeded")
        try:
            return self.engine.encode(ids)  # token ids outside the vocabulary, empty prompts
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    def sampling(self, req, prompt_len: int, max_tokens: int | None, default_max: int | None,
                 logprobs: int | None) -> SamplingParams:
        limit = self.engine.max_model_len
        room = limit - prompt_len
        if max_tokens is None:
            # Up to the context, or what the whole KV cache holds when that is less (the engine refuses a
            # request that could outgrow the cache).
            cache = self.engine.runner.num_blocks * self.engine.config.block_size
            room_default = max(1, min(room, cache - prompt_len))
            max_tokens = room_default if default_max is None else min(default_max, room_default)
        elif max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                           "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        try:
            return SamplingParams(
                n=req.n or 1, temperature=1.0 if req.temperature is None else req.temperature,
                # OpenAI allows top_p 0: keep only the most likely token
                top_p=1.0 if req.top_p is None else max(req.top_p, 1e-9),
                top_k=-1 if req.top_k is None else req.top_k, min_p=req.min_p or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, max_tokens=max_tokens, seed=req.seed,
                stop=req.stop or [], ignore_eos=bool(req.ignore_eos), logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e).split(", got ")[0]) from None


class Run:
    """One admitted engine request as the server sees it.

    A source may hand over one RequestOutput updated in place (a later step's delta_* fields may be there by the
    time this thread reads them), and AsyncLLM merges the steps a slow reader missed: new text, tokens and
    logprobs are therefore read by cursor from the cumulative fields."""

    def __init__(self, state: ServerState, prompt: list[int], params: SamplingParams, request_id: str):
        self.state, self.n, self.t0 = state, params.n, time.perf_counter()
        self.gen = state.llm.generate(prompt, params, request_id)
        self.out: RequestOutput | None = None
        self._text, self._tok, self._lp = [0] * self.n, [0] * self.n, [0] * self.n
        self.finished = self.closed = self._first = False

    async def start(self) -> None:
        """Queue the request and wait for its first output; APIError if the engine refuses it."""
        try:
            self.out = await anext(self.gen)
            self.state.metrics.prompt_tokens.inc(by=len(self.out.prompt_token_ids))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except RuntimeError as e:
            raise APIError(500, f"generation failed: {e}", type="server_error") from None

    def take(self) -> list[tuple[int, str, list[int], list]]:
        """What each sample gained since the last take: (index, text, token_ids, logprobs)."""
        new, count = [], 0
        for i, o in enumerate(self.out.outputs):
            ntok = len(o.token_ids)  # read the token count first: text and logprobs are updated after it
            text = o.text
            ids = o.token_ids[self._tok[i]:ntok]
            lps = o.logprobs[self._lp[i]:min(len(o.logprobs), ntok)] if o.logprobs is not None else []
            delta = text[self._text[i]:]
            self._text[i], self._tok[i], self._lp[i] = len(text), self._tok[i] + len(ids), self._lp[i] + len(lps)
            count += len(ids)
            if delta or ids or lps:
                new.append((i, delta, ids, lps))
        m = self.state.metrics
        m.generation_tokens.inc(by=count)
        if count and not self._first:
            self._first = True
            m.ttft.observe(time.perf_counter() - self.t0)
        return new

    async def updates(self) -> AsyncIterator[list[tuple[int, str, list[int], list]]]:
        """take() after every engine step, until the request finishes."""
        try:
            yield self.take()
            if not self.out.finished:
                async for out in self.gen:
                    self.out = out
                    yield self.take()
            # the generator ended on an output marked finished: everything is final now
            if tail := self.take():
                yield tail
            self.finished = True
            self.state.metrics.latency.observe(time.perf_counter() - self.t0)
        except RuntimeError as e:  # an engine step failed
            raise APIError(500, f"generation failed: {e}", type="server_error") from None
        finally:
            await self.close()

    def stop(self) -> None:
        """The server ends the request itself (the output filter blocked it): close() then aborts it in the
        engine, which frees its KV blocks, without counting a client abort."""
        self.finished = True
        self.state.metrics.latency.observe(time.perf_counter() - self.t0)

    async def close(self) -> None:
        """Abort the request if it is still running (a client disconnect) and release its admission; idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            self.state.metrics.aborts.inc()
        try:
            await self.gen.aclose()  # AsyncLLM's generator aborts the request in its finally
        finally:
            self.state.in_flight -= 1

    def usage(self) -> dict:
        out = self.out
        prompt, completion = len(out.prompt_token_ids), sum(len(o.token_ids) for o in out.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": out.metrics.num_cached_tokens}}


class EventStream(StreamingResponse):
    """Server-sent events whose source is closed whatever ends the response: the stream finishing, the client
    disconnecting (Starlette cancels the body), a send failing, or shutdown cancelling the task."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self._on_close()


def _safe(text: str) -> str:
    """JSON written with ensure_ascii=False keeps U+0085, U+2028 and U+2029 as they are; escape them, because
    clients that split the stream with str.splitlines (httpx's iter_lines) would cut an event there."""
    if "\u2028" in text or "\u2029" in text or "\x85" in text:
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
    return text


def sse(obj: dict) -> str:
    return f"data: {_safe(json.dumps(obj, ensure_ascii=False, separators=(',', ':')))}\n\n"


def json_str(text: str) -> str:
    """text as a JSON string literal, exactly as sse() writes it."""
    return _safe(encode_basestring(text))


class Chunks:
    """The streaming chunks of one response whose fields before "choices" (id, object, created, model, ...) are
    the same in every chunk: those are serialized once, so the common chunk (a choice's new text, no logprobs,
    no finish reason) costs one string escape instead of a json.dumps of the whole object. Same bytes as sse()."""

    def __init__(self, head: dict):
        self.head = head
        self._prefix = "data: " + _safe(json.dumps(head, ensure_ascii=False, separators=(",", ":")))[:-1] + \
            ',"choices":[{"index":'

    def text(self, i: int, text: str) -> str:
        """A /v1/completions chunk: {"index": i, "text": text, "logprobs": null, "finish_reason": null}."""
        return f'{self._prefix}{i},"text":{json_str(text)},"logprobs":null,"finish_reason":null}}]}}\n\n'

    def delta(self, i: int, delta: dict[str, str]) -> str:
        """A chat chunk: {"index": i, "delta": delta, "logprobs": null, "finish_reason": null}; delta's keys are
        plain names (content, reasoning_content, role) and its values strings."""
        body = ",".join(f'"{k}":{json_str(v)}' for k, v in delta.items())
        return f'{self._prefix}{i},"delta":{{{body}}},"logprobs":null,"finish_reason":null}}]}}\n\n'


def clamp_logprob(value: float) -> float:
    return max(value, -9999.0)  # -inf is not JSON


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def open_run(state: ServerState, prompt: list[int], params: SamplingParams, request_id: str) -> Run:
    """Admit a request (429 past max_queue), queue it in the engine and wait for its first output."""
    state.admit()
    run = Run(state, prompt, params, request_id)
    try:
        await run.start()
    except BaseException:
        await run.close()
        raise
    return run


async def collect(run: Run, request: Request, guard: OutputGuard | None = None) -> bool:
    """Run a non-streaming request to the end (or until the guard's output filter stops it); False if the client
    went away first (the request is aborted)."""
    async def drain():
        async with aclosing(run.updates()) as updates:
            async for update in updates:
                if guard is not None:
                    guard.filter(update, run.out.outputs)
                    if guard.stopped:
                        run.stop()
                        break

    task, gone = asyncio.ensure_future(drain()), asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # the cancellation reaches AsyncLLM's generator, which aborts the request
            await asyncio.wait({task})
        await run.close()
    if task.cancelled():
        return False
    task.result()
    return True
