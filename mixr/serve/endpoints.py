"""/v1/chat/completions and /v1/completions: request -> prompt ids and SamplingParams -> a Run -> OpenAI's
response objects, whole or as server-sent events. With a safety config (state.safety) the input filter decides
before the request is admitted, and an OutputGuard stands between the engine's outputs and the client."""

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mixr.safety import FilterDecision
from mixr.sampling import SamplingParams
from mixr.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from mixr.serve.reasoning import ReasoningParser
from mixr.serve.safety import OutputGuard
from mixr.serve.state import THINK_START, Chunks, EventStream, Run, ServerState, clamp_logprob, collect, open_run, sse
from mixr.tokenizer import TokenizerError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


# -- shared ----------------------------------------------------------------------------------------------------
async def _screen(state: ServerState, prompt: str | list[dict], param: str, params: SamplingParams,
                  client_k: int | None, rid: str, endpoint: str, stream: bool
                  ) -> tuple[FilterDecision | None, SamplingParams, OutputGuard | None]:
    """The safety layer's part before a request runs: the input filter's decision (a 400 in mode "error"),
    the SamplingParams with watermark and audit logprobs, and the output guard. All None/unchanged without a
    safety config; an unallowed decision (mode "refusal") means: answer with the refusal, run nothing."""
    if state.safety is None:
        return None, params, None
    decision = await state.safety.check_input(prompt, param, rid, state.model_name, endpoint, stream)
    if not decision.allowed:
        return decision, params, None
    return decision, state.safety.sampling(params), state.safety.guard(params.n, client_k)


def _final(run: Run, guard: OutputGuard | None, i: int) -> tuple[str, list[int], list | None, str | None]:
    """A whole choice as the client gets it: text, token ids and logprobs (for its logprobs), finish reason."""
    o = run.out.outputs[i]
    if guard is None:
        return o.text, o.token_ids, o.logprobs, o.finish_reason
    return guard.text[i], *guard.released(i), guard.finish_reason(i, o)


def _audit_field(guard: OutputGuard | None, i: int) -> dict:
    audit = guard.audit(i) if guard is not None else None
    return {} if audit is None else {"mixr_audit": audit}


def _refusal_usage(prompt_len: int) -> dict:
    return {"prompt_tokens": prompt_len, "completion_tokens": 0, "total_tokens": prompt_len,
            "prompt_tokens_details": {"cached_tokens": 0}}


async def _events(events: list[str]) -> AsyncIterator[str]:
    yield "".join(events) + "data: [DONE]\n\n"


async def _nothing() -> None:
    pass


# -- chat ------------------------------------------------------------------------------------------------------
def _chat_logprobs(state: ServerState, ids: list[int], lps: list) -> list[dict]:
    entries = []
    for tid, (lp, top) in zip(ids, lps):
        text, raw = state.piece(tid)
        alts = []
        for alt_id, alt_lp in top:
            alt_text, alt_raw = state.piece(alt_id)
            alts.append({"token": alt_text, "logprob": clamp_logprob(alt_lp), "bytes": alt_raw})
        entries.append({"token": text, "logprob": clamp_logprob(lp), "bytes": raw, "top_logprobs": alts})
    return entries


async def chat_completions(state: ServerState, req: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    messages = [m.for_template() for m in req.messages]
    try:
        text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except (jinja2.TemplateError, TokenizerError, TypeError, ValueError) as e:
        raise APIError(400, f"the messages cannot be rendered with the model's chat template: {e}",
                       param="messages") from None
    ids = state.prompt_ids(state.tokenizer.encode(text, add_special_tokens=False), "messages")
    client_k = (req.top_logprobs or 0) if req.logprobs else None
    params = state.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, None, client_k)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    decision, params, guard = await _screen(state, messages, "messages", params, client_k, rid, CHAT,
                                            bool(req.stream))
    if decision is not None and not decision.allowed:
        return _chat_refusal(state, decision.message, rid, created, params.n, len(ids), bool(req.stream),
                             include_usage)
    # DeepSeek-R1's template ends the prompt with `<think>\n`: the output starts inside the think block
    in_think = text.rstrip().endswith(THINK_START)
    parsers = [ReasoningParser(in_think) if state.reasoning else None for _ in range(params.n)]
    run = await open_run(state, ids, params, rid)
    if req.stream:
        return EventStream(_chat_stream(state, run, parsers, bool(req.logprobs), include_usage, rid, created,
                                        decision, guard), run.close)
    done = await collect(run, request, guard)
    if state.safety is not None:
        state.safety.finish(rid, state.model_name, CHAT, decision, guard, run.out.outputs, run.usage())
    if not done:
        return Response(status_code=499)  # the client left: nobody to answer
    choices = []
    for i in range(run.n):
        text, out_ids, out_lps, finish = _final(run, guard, i)
        message = {"role": "assistant", "content": text}
        if parsers[i] is not None:
            reasoning, content = parsers[i].parse(text)
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
        logprobs = {"content": _chat_logprobs(state, out_ids, out_lps)} if req.logprobs else None
        choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish,
                        **_audit_field(guard, i)})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                         "choices": choices, "usage": run.usage(), "system_fingerprint": None})


def _chat_refusal(state: ServerState, message: str, rid: str, created: int, n: int, prompt_len: int, stream: bool,
                  include_usage: bool) -> Response:
    """The answer to a request the input filter blocked in mode "refusal": the refusal as the assistant's
    message, finish_reason "content_filter", nothing generated."""
    reasoning = {"reasoning_content": None} if state.reasoning else {}
    if not stream:
        choices = [{"index": i, "message": {"role": "assistant", "content": message, **reasoning},
                    "logprobs": None, "finish_reason": "content_filter"} for i in range(n)]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                             "choices": choices, "usage": _refusal_usage(prompt_len), "system_fingerprint": None})
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
            "system_fingerprint": None} | ({"usage": None} if include_usage else {})
    events = [sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]})
              for i in range(n) for delta, finish in (({"role": "assistant", "content": ""}, None),
                                                      ({"content": message}, None), ({}, "content_filter"))]
    if include_usage:
        events.append(sse({**head, "choices": [], "usage": _refusal_usage(prompt_len)}))
    return EventStream(_events(events), _nothing)


async def _chat_stream(state: ServerState, run: Run, parsers: list, logprobs: bool, include_usage: bool, rid: str,
                       created: int, decision: FilterDecision | None, guard: OutputGuard | None
                       ) -> AsyncIterator[str]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
            "system_fingerprint": None}
    if include_usage:
        head["usage"] = None
    chunks = Chunks(head)

    def chunk(i: int, delta: dict, lps: list | None = None, finish: str | None = None,
              extra: dict | None = None) -> str:
        if lps is None and finish is None and not extra:
            return chunks.delta(i, delta)  # the common chunk: new text only
        choice = {"index": i, "delta": delta, "logprobs": {"content": lps} if lps is not None else None,
                  "finish_reason": finish, **(extra or {})}
        return sse({**head, "choices": [choice]})

    def split(reasoning_and_content: tuple[str, str]) -> dict:
        reasoning, content = reasoning_and_content
        return ({"reasoning_content": reasoning} if reasoning else {}) | ({"content": content} if content else {})

    try:
        yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(run.n))
        async with aclosing(run.updates()) as updates:
            async for update in updates:
                if guard is not None:
                    update = guard.filter(update, run.out.outputs)
                events = []
                for i, text, ids, lps in update:
                    delta = {"content": text} if parsers[i] is None else split(parsers[i].feed(text))
                    entries = _chat_logprobs(state, ids, lps) if logprobs and lps else None
                    if delta or entries:
                        events.append(chunk(i, delta, entries))
                if events:
                    yield "".join(events)
                if guard is not None and guard.stopped:
                    run.stop()
                    break
        events = []
        for i, o in enumerate(run.out.outputs):
            delta = split(parsers[i].finish()) if parsers[i] is not None else {}
            finish = guard.finish_reason(i, o) if guard is not None else o.finish_reason
            events.append(chunk(i, delta, None, finish, _audit_field(guard, i)))
        if include_usage:
            events.append(sse({**head, "choices": [], "usage": run.usage()}))
        yield "".join(events) + "data: [DONE]\n\n"
    except APIError as e:  # the status line is sent already: the error goes in the stream
        yield sse(e.body()) + "data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream
        if state.safety is not None:
            state.safety.finish(rid, state.model_name, CHAT, decision, guard, run.out.outputs, run.usage(), True)


# -- completions -----------------------------------------------------------------------------------------------
def _completion_logprobs(state: ServerState, ids: list[int], lps: list, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, (lp, top) in zip(ids, lps):
        text = state.piece(tid)[0]
        tokens.append(text)
        token_lps.append(clamp_logprob(lp))
        tops.append({state.piece(a)[0]: clamp_logprob(alp) for a, alp in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


async def completions(state: ServerState, req: CompletionRequest, request: Request) -> Response:
    state.check_model(req.model)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise APIError(400, "best_of is not supported (other than best_of == n)", param="best_of")
    prompt = state.tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
    ids = state.prompt_ids(prompt, "prompt")
    params = state.sampling(req, len(ids), req.max_tokens, 16, req.logprobs)  # OpenAI's default: 16 tokens
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    # the input filter reads text; decoding a long prompt of token ids costs, so only when there is one
    prompt_text = req.prompt if isinstance(req.prompt, str) else \
        state.tokenizer.decode(ids) if state.safety is not None else ""
    decision, params, guard = await _screen(state, prompt_text, "prompt", params, req.logprobs, rid, COMPLETIONS,
                                            bool(req.stream))
    if decision is not None and not decision.allowed:
        return _completion_refusal(state, decision.message, rid, created, params.n, len(ids), bool(req.stream),
                                   include_usage)
    run = await open_run(state, ids, params, rid)
    want_lp = req.logprobs is not None
    if req.stream:
        return EventStream(_completion_stream(state, run, want_lp, include_usage, rid, created, decision, guard),
                           run.close)
    done = await collect(run, request, guard)
    if state.safety is not None:
        state.safety.finish(rid, state.model_name, COMPLETIONS, decision, guard, run.out.outputs, run.usage())
    if not done:
        return Response(status_code=499)
    choices = []
    for i in range(run.n):
        text, out_ids, out_lps, finish = _final(run, guard, i)
        choices.append({"index": i, "text": text, "finish_reason": finish,
                        "logprobs": _completion_logprobs(state, out_ids, out_lps, 0) if want_lp else None,
                        **_audit_field(guard, i)})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                         "choices": choices, "usage": run.usage(), "system_fingerprint": None})


def _completion_refusal(state: ServerState, message: str, rid: str, created: int, n: int, prompt_len: int,
                        stream: bool, include_usage: bool) -> Response:
    choices = [{"index": i, "text": message, "finish_reason": "content_filter", "logprobs": None} for i in range(n)]
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "system_fingerprint": None}
    if not stream:
        return JSONResponse({**head, "choices": choices, "usage": _refusal_usage(prompt_len)})
    head |= {"usage": None} if include_usage else {}
    events = [sse({**head, "choices": [{**c, "finish_reason": None}]}) for c in choices]
    events += [sse({**head, "choices": [{**c, "text": ""}]}) for c in choices]
    if include_usage:
        events.append(sse({**head, "choices": [], "usage": _refusal_usage(prompt_len)}))
    return EventStream(_events(events), _nothing)


async def _completion_stream(state: ServerState, run: Run, want_lp: bool, include_usage: bool, rid: str,
                             created: int, decision: FilterDecision | None, guard: OutputGuard | None
                             ) -> AsyncIterator[str]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "system_fingerprint": None}
    if include_usage:
        head["usage"] = None
    offsets = [0] * run.n
    chunks = Chunks(head)

    def chunk(i: int, text: str, logprobs: dict | None = None, finish: str | None = None,
              extra: dict | None = None) -> str:
        if logprobs is None and finish is None and not extra:
            return chunks.text(i, text)  # the common chunk: new text only
        return sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish,
                                         **(extra or {})}]})

    try:
        async with aclosing(run.updates()) as updates:
            async for update in updates:
                if guard is not None:
                    update = guard.filter(update, run.out.outputs)
                events = []
                for i, text, ids, lps in update:
                    logprobs = _completion_logprobs(state, ids, lps, offsets[i]) if want_lp and lps else None
                    if logprobs:
                        offsets[i] += sum(len(t) for t in logprobs["tokens"])
                    events.append(chunk(i, text, logprobs))
                if events:
                    yield "".join(events)
                if guard is not None and guard.stopped:
                    run.stop()
                    break
        events = [chunk(i, "", None, guard.finish_reason(i, o) if guard is not None else o.finish_reason,
                        _audit_field(guard, i)) for i, o in enumerate(run.out.outputs)]
        if include_usage:
            events.append(sse({**head, "choices": [], "usage": run.usage()}))
        yield "".join(events) + "data: [DONE]\n\n"
    except APIError as e:
        yield sse(e.body()) + "data: [DONE]\n\n"
    finally:
        if state.safety is not None:
            state.safety.finish(rid, state.model_name, COMPLETIONS, decision, guard, run.out.outputs, run.usage(),
                                True)
