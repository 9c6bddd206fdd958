"""A deployment's SafetyConfig (mixr.safety) as the server applies it.

Per request: the input filter before the request is admitted (a 400 with code "content_filter", or a refusal);
the watermark, and the engine's logprobs for the audit, added to the SamplingParams; an OutputGuard between the
engine's outputs and the client (the stream filter, the logprobs the client asked for, the audit statistics);
and one line in the JSONL audit log when the response ends.
"""

import asyncio
import dataclasses
import math

from mixr.safety import AuditLog, FilterDecision, SafetyConfig, StreamFilter, audit_response, check_input
from mixr.sampling import SamplingParams
from mixr.serve.metrics import ServerMetrics
from mixr.serve.protocol import APIError


def _finite(obj):
    """JSON has no inf/nan: a span of impossible tokens would otherwise fail the whole response."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return -9999.0 if obj < 0 else 9999.0 if obj > 0 else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


class ServerSafety:
    def __init__(self, cfg: SafetyConfig, tokenizer, secrets: list[str], metrics: ServerMetrics):
        self.cfg, self.tokenizer, self.metrics = cfg, tokenizer, metrics
        # the API key and the watermark key are redacted from every log line, wherever they appear
        self.log = AuditLog(cfg.audit.log_path, [*secrets, *cfg.secrets()]) if cfg.audit.log_path else None
        self.filter_output = cfg.filter.filter_output and bool(cfg.filter.rules)

    async def check_input(self, prompt: str | list[dict], param: str, request_id: str, model: str, endpoint: str,
                          stream: bool) -> FilterDecision:
        """The input filter's decision; a blocked request is logged, and raises APIError (400, code
        content_filter) in mode "error". In mode "refusal" it comes back as the decision: the caller answers."""
        if self.cfg.filter.classifier is None:
            decision = check_input(prompt, self.cfg.filter, self.tokenizer)
        else:  # a classifier may run a model: keep the event loop serving other requests meanwhile
            decision = await asyncio.to_thread(check_input, prompt, self.cfg.filter, self.tokenizer)
        if not decision.allowed:
            self.metrics.content_filtered.inc("input")
            self.finish(request_id, model, endpoint, decision, stream=stream)
            if self.cfg.filter.mode == "error":
                raise APIError(400, decision.message, param=param, code="content_filter")
        return decision

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """The deployment's watermark, and enough logprobs from the engine for the audit."""
        params = self.cfg.apply(params)
        if self.cfg.audit.enabled:
            params = dataclasses.replace(params, logprobs=max(params.logprobs or 0, self.cfg.audit.top_logprobs))
        return params

    def guard(self, n: int, client_logprobs: int | None) -> "OutputGuard":
        return OutputGuard(self, n, client_logprobs)

    def finish(self, request_id: str, model: str, endpoint: str, decision: FilterDecision,
               guard: "OutputGuard | None" = None, outputs=None, usage: dict | None = None,
               stream: bool = False) -> None:
        """Once per request, however it ended: count the outputs the filter stopped, and write the request's
        line in the audit log (when there is one): filter decisions, audit statistics, and what the response
        was. Never the prompt, the API key or the request headers."""
        if guard is not None:
            self.metrics.content_filtered.inc("output", by=sum(d is not None for d in guard.blocked))
        if self.log is None:
            return
        decisions = [{"stage": "input", **dataclasses.asdict(decision)}]
        meta = {"endpoint": endpoint, "stream": stream, "watermarked": self.cfg.watermark is not None}
        audit = None
        if guard is not None:
            decisions += [{"stage": "output", "index": i, **dataclasses.asdict(d)}
                          for i, d in enumerate(guard.blocked) if d is not None]
            audit = [guard.audit(i) for i in range(guard.n)] if self.cfg.audit.enabled else None
            # a choice with no finish reason was cut short: the client went away or the server shut down
            meta["finish_reasons"] = [guard.finish_reason(i, o) or "abort" for i, o in enumerate(outputs)]
        elif not decision.allowed:
            meta["finish_reasons"] = ["content_filter"]
        if usage is not None:
            meta["prompt_tokens"], meta["completion_tokens"] = usage["prompt_tokens"], usage["completion_tokens"]
        self.log.write(request_id, model, decisions, audit, meta)


class OutputGuard:
    """One request's outputs on their way to the client.

    filter(update, outputs) takes what Run.take() read from the engine and returns what the client may see:
    text the stream filter released, and the logprobs the client asked for (top alternatives cut to its
    count) of tokens whose text has been released, so a logprob entry never shows text the filter holds back
    or blocked. A choice that hits a blocked pattern ends with finish_reason "content_filter"; once no choice
    is still running, `stopped` tells the caller to end the engine request (which frees its KV blocks).
    All tokens and logprobs are kept for the audit."""

    def __init__(self, safety: ServerSafety, n: int, client_logprobs: int | None):
        self.safety, self.n, self.k = safety, n, client_logprobs
        fcfg = safety.cfg.filter
        self.filters = [StreamFilter(fcfg) for _ in range(n)] if safety.filter_output else None
        self.text = [""] * n  # released to the client
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.lps: list[list] = [[] for _ in range(n)]
        self.sent = [0] * n  # tokens whose logprobs were released
        self.blocked: list[FilterDecision | None] = [None] * n
        self.ended = [False] * n
        self._audit: dict[int, dict | None] = {}
        # where each token's text ends in the stream (None: not shown yet, e.g. part of a UTF-8 character);
        # needed only to hold logprobs back with the text
        self.track = self.filters is not None and client_logprobs is not None
        self.decoders = [safety.tokenizer.decode_stream() for _ in range(n)] if self.track else None
        self.ends: list[list[int | None]] = [[] for _ in range(n)]
        self.streamed = [0] * n

    @property
    def stopped(self) -> bool:
        """A choice was blocked and none is still running: the engine request can end now."""
        return any(d is not None for d in self.blocked) and all(self.ended)

    def finish_reason(self, i: int, output) -> str | None:
        return "content_filter" if self.blocked[i] is not None else output.finish_reason

    def filter(self, update: list, outputs) -> list[tuple[int, str, list[int], list]]:
        got = {i: (text, ids, lps) for i, text, ids, lps in update}
        released = []
        for i in range(self.n):
            finishing = outputs[i].finish_reason is not None and not self.ended[i]
            # what a blocked choice generates afterwards (n > 1: its sequence runs on) is dropped
            if self.blocked[i] is not None or (i not in got and not finishing):
                continue
            text, ids, lps = got.get(i, ("", [], []))
            self.ids[i] += ids
            self.lps[i] += lps
            if self.track:
                self._place(i, ids)
            out, stop = text, False
            if self.filters is not None:
                out, stop = self.filters[i].feed(text)
                if finishing and not stop:  # the end: release what was held back, unless it completes a match
                    tail, stop = self.filters[i].finish()
                    out += tail
                if stop:
                    self.blocked[i] = self.filters[i].decision
            self.ended[i] = self.ended[i] or finishing or stop
            self.text[i] += out
            rel_ids, rel_lps = self._release(i, final=self.ended[i] and self.blocked[i] is None)
            if out or rel_ids or rel_lps:
                released.append((i, out, rel_ids, rel_lps))
        return released

    def _place(self, i: int, ids: list[int]) -> None:
        ends = self.ends[i]
        for t in ids:
            piece = self.decoders[i].step(t)
            ends.append(None)
            if piece:
                self.streamed[i] += len(piece)
                j = len(ends) - 1
                while j >= 0 and ends[j] is None:  # tokens held by the decoder show with this one
                    ends[j] = self.streamed[i]
                    j -= 1

    def _release(self, i: int, final: bool) -> tuple[list[int], list]:
        if self.k is None:
            return [], []
        ready = min(len(self.ids[i]), len(self.lps[i]))  # logprobs may trail their tokens by a step
        if self.track and not final:
            shown = len(self.text[i])
            j = self.sent[i]
            while j < ready and self.ends[i][j] is not None and self.ends[i][j] <= shown:
                j += 1
            ready = j
        a, self.sent[i] = self.sent[i], max(self.sent[i], ready)
        ids = self.ids[i][a:self.sent[i]]
        lps = [(lp, top[:self.k]) for lp, top in self.lps[i][a:self.sent[i]]]
        return ids, lps

    def released(self, i: int) -> tuple[list[int], list]:
        """The token ids and logprobs (cut to the client's count) released to the client so far."""
        if self.k is None:
            return [], []
        return self.ids[i][:self.sent[i]], [(lp, top[:self.k]) for lp, top in self.lps[i][:self.sent[i]]]

    def audit(self, i: int) -> dict | None:
        """The choice's audit statistics (computed once), or None when the audit is off."""
        cfg = self.safety.cfg.audit
        if not cfg.enabled:
            return None
        if i not in self._audit:
            lps = self.lps[i]
            # span texts are cut to what the client was shown: the audit never reveals blocked text
            stats = audit_response(lps, self.ids[i][:len(lps)], self.safety.tokenizer, self.text[i], cfg)
            self._audit[i] = _finite(stats.to_dict())
        return self._audit[i]
