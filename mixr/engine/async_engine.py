"""AsyncLLM: the engine behind an asyncio API, for servers.

One background thread runs engine steps while there is work; each request gets an async generator of its
incremental outputs. Closing the generator early (a client disconnect) aborts the request and frees its blocks.
"""

import asyncio
import dataclasses
import itertools
import threading
from collections.abc import AsyncIterator

from mixr.engine.llm_engine import LLMEngine, RequestOutput
from mixr.sampling import SamplingParams


def _snapshot(out: RequestOutput) -> RequestOutput:
    """This step's view of a request: the engine rewrites the delta fields next step, while the reader may lag.
    token_ids / logprobs stay the live lists (copying them every step would cost O(n^2))."""
    return dataclasses.replace(out, outputs=[dataclasses.replace(o) for o in out.outputs],
                               metrics=dataclasses.replace(out.metrics))


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()  # the engine is not thread-safe: one step or one add/abort at a time
        self._work = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mixr-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._work.wait()
            try:
                with self._lock:
                    outputs = self.engine.step()
                    idle = not self.engine.has_unfinished_requests()
                    if idle:
                        self._work.clear()
            except BaseException as e:  # a failed step fails every request in flight, loudly
                self._error = e
                with self._lock:
                    for rid in list(self._queues):
                        self.engine.abort_request(rid)
                        self._deliver(rid, e)
                    self._work.clear()
                continue
            for out in outputs:
                self._deliver(out.request_id, _snapshot(out))

    def _deliver(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's RequestOutput after every step that advanced it; the last one has finished=True.
        Raises ValueError at once for a request that cannot run."""
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(rid, prompt, params)  # ValueError: nothing was queued
            self._queues[rid] = (asyncio.get_running_loop(), queue)
            self._work.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"engine step failed: {item!r}") from item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._queues.pop(rid, None)
                if not finished:
                    self.engine.abort_request(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort_request(request_id)
        self._deliver(request_id, RuntimeError(f"request {request_id} was aborted"))
