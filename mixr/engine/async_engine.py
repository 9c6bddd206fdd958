"""AsyncLLM: the engine behind an asyncio API, for servers.

One background thread owns the engine and steps it while there is work. Event loops never wait on it: a new
request or an abort is a message in an inbox that the thread applies before its next step, and each step's
outputs go back to an event loop in one call_soon_threadsafe for all of its requests (not one per request or
token). Each request gets an async generator of its incremental outputs; a reader that falls behind gets the
steps it missed merged into one output. Closing the generator early (a client disconnect) aborts the request
and frees its blocks.
"""

import asyncio
import collections
import itertools
import threading
from collections.abc import AsyncIterator

from mixr.engine.llm_engine import CompletionOutput, LLMEngine, RequestMetrics, RequestOutput
from mixr.sampling import SamplingParams


def _snapshot(out: RequestOutput) -> RequestOutput:
    """This step's view of a request: the engine rewrites the delta fields and metrics next step, while the reader
    may lag. token_ids / logprobs stay the live lists (copying them every step would cost O(n^2)). Built by hand:
    dataclasses.replace costs several times more, for every running request at every step."""
    m = out.metrics
    return RequestOutput(out.request_id, out.prompt_token_ids,
                         [CompletionOutput(o.index, o.token_ids, o.text, o.finish_reason, o.logprobs, o.delta_text,
                                           o.delta_token_ids) for o in out.outputs],
                         RequestMetrics(m.arrival_time, m.first_token_time, m.finish_time, m.num_prompt_tokens,
                                        m.num_cached_tokens, m.num_generated_tokens),
                         out.finished)


def _merge(items: list[RequestOutput]) -> RequestOutput:
    """Several steps' snapshots of one request as one: the latest, with the deltas of all of them."""
    last = items[-1]
    if len(items) > 1:
        for k, o in enumerate(last.outputs):
            o.delta_text = "".join(it.outputs[k].delta_text for it in items)
            o.delta_token_ids = [t for it in items for t in it.outputs[k].delta_token_ids]
    return last


class _Failure:
    """An error for one stream, raised by its reader: `error` as it is (a refused request's ValueError), or
    wrapped in RuntimeError (a failed step, an abort)."""

    __slots__ = ("error", "wrap")

    def __init__(self, error: BaseException, wrap: bool):
        self.error, self.wrap = error, wrap

    def raise_(self):
        if self.wrap:
            raise RuntimeError(f"engine step failed: {self.error!r}") from self.error
        raise self.error


class _Stream:
    """One request's mailbox, on its event loop: items the engine thread delivered, and the reader's future."""

    __slots__ = ("aborted", "closed", "loop", "pending", "request_id", "waiter")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id, self.loop = request_id, loop
        self.pending: list = []
        self.waiter: asyncio.Future | None = None
        self.closed = False  # the reader is gone: drop what still arrives
        self.aborted: asyncio.Future | None = None  # set once the engine has aborted the request


_ABORTED = object()  # the engine thread's acknowledgement of a closed stream's abort


def _dispatch(batch: list[tuple[_Stream, object]]) -> None:
    """On the event loop: one engine step's items for this loop's streams."""
    for stream, item in batch:
        if item is _ABORTED:
            if stream.aborted is not None and not stream.aborted.done():
                stream.aborted.set_result(None)
            continue
        if stream.closed:
            continue
        stream.pending.append(item)
        waiter = stream.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        # The engine is not thread-safe: only the engine thread touches it, under this lock (held for a step or
        # for applying the inbox); callers outside may take it to read consistent engine state.
        self._lock = threading.Lock()
        self._inbox: collections.deque = collections.deque()  # ("add", stream, ids, params), ("close", stream), ...
        self._wake = threading.Event()
        self._running: dict[str, _Stream] = {}  # engine thread only: the requests it holds, by id
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mixr-engine", daemon=True)
        self._thread.start()

    def _submit(self, message: tuple) -> None:
        self._inbox.append(message)
        self._wake.set()

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()  # before draining: a message appended after this sets it again
            out: dict[asyncio.AbstractEventLoop, list] = {}
            try:
                with self._lock:
                    self._apply_inbox(out)
                    if self.engine.has_unfinished_requests():
                        for o in self.engine.step():
                            stream = self._running.get(o.request_id)
                            if stream is None:
                                continue
                            if o.finished:
                                del self._running[o.request_id]
                            out.setdefault(stream.loop, []).append((stream, _snapshot(o)))
                    if self.engine.has_unfinished_requests():
                        self._wake.set()
            except BaseException as e:  # a failed step fails every request in flight, loudly
                self._error = e
                with self._lock:
                    for rid, stream in self._running.items():
                        self.engine.abort_request(rid)
                        out.setdefault(stream.loop, []).append((stream, _Failure(e, wrap=True)))
                    self._running.clear()
            self._send(out)

    def _apply_inbox(self, out: dict) -> None:
        while self._inbox:
            kind, stream, *args = self._inbox.popleft()
            rid = stream.request_id
            if kind == "add":
                try:
                    self.engine.add_request(rid, *args)
                except Exception as e:  # nothing was queued: the reader raises it (a ValueError as it is)
                    out.setdefault(stream.loop, []).append((stream, _Failure(e, wrap=not isinstance(e, ValueError))))
                else:
                    self._running[rid] = stream
            elif kind == "abort_id":  # abort(request_id): its reader gets an error
                if (target := self._running.pop(rid, None)) is not None:
                    error = RuntimeError(f"request {rid} was aborted")
                    out.setdefault(target.loop, []).append((target, _Failure(error, wrap=True)))
                    self.engine.abort_request(rid)
            else:  # "close": the reader is gone and waits for this acknowledgement; "drop": so is its event loop
                if kind == "close":
                    out.setdefault(stream.loop, []).append((stream, _ABORTED))
                if self._running.get(rid) is stream:  # not a later request that reuses the id
                    del self._running[rid]
                    self.engine.abort_request(rid)

    def _send(self, out: dict) -> None:
        for loop, batch in out.items():
            try:
                loop.call_soon_threadsafe(_dispatch, batch)
            except RuntimeError:  # the loop is closed: nobody reads these requests any more
                for stream, _ in batch:
                    self._submit(("drop", stream))

    # -- the event loop side -------------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutput after every step that advanced it (the steps a slow reader missed
        come merged: delta_text / delta_token_ids hold all of them); the last one has finished=True.
        Raises ValueError before any output for a request that cannot run."""
        rid = request_id or f"req-{next(self._ids)}"
        ids = self.engine.encode(prompt)  # ValueError: nothing was queued (tokenizing here, not in the engine thread)
        loop = asyncio.get_running_loop()
        stream = _Stream(rid, loop)
        self._submit(("add", stream, ids, params))
        finished = False
        try:
            while True:
                if not stream.pending:
                    stream.waiter = loop.create_future()
                    try:
                        await stream.waiter
                    finally:
                        stream.waiter = None
                items, stream.pending = stream.pending, []
                for k, item in enumerate(items):
                    if isinstance(item, _Failure):
                        if k == 0:
                            finished = True  # the engine holds nothing of this request any more
                            item.raise_()
                        items, stream.pending = items[:k], items[k:]  # the outputs before it first
                        break
                out = _merge(items)
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            stream.closed = True
            if not finished:
                # Wait (without blocking the loop) until the engine has dropped the request, so its blocks are
                # free when the reader's close returns.
                stream.aborted = loop.create_future()
                self._submit(("close", stream))
                await asyncio.shield(stream.aborted)

    def abort(self, request_id: str) -> None:
        """Abort a running request; its reader gets a RuntimeError. Applied before the engine's next step."""
        self._submit(("abort_id", _Stream(request_id, None)))
