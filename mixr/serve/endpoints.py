"""/v1/chat/completions and /v1/completions: request -> prompt ids and SamplingParams -> a Run -> OpenAI's
response objects, whole or as server-sent events."""

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mixr.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from mixr.serve.reasoning import ReasoningParser
from mixr.serve.state import THINK_START, EventStream, Run, ServerState, clamp_logprob, collect, open_run, sse
from mixr.tokenizer import TokenizerError


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
    try:
        text = state.tokenizer.apply_chat_template([m.for_template() for m in req.messages],
                                                   add_generation_prompt=True)
    except (jinja2.TemplateError, TokenizerError, TypeError, ValueError) as e:
        raise APIError(400, f"the messages cannot be rendered with the model's chat template: {e}",
                       param="messages") from None
    ids = state.prompt_ids(state.tokenizer.encode(text, add_special_tokens=False), "messages")
    params = state.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, None,
                            (req.top_logprobs or 0) if req.logprobs else None)
    # DeepSeek-R1's template ends the prompt with `<think>\n`: the output starts inside the think block
    in_think = text.rstrip().endswith(THINK_START)
    parsers = [ReasoningParser(in_think) if state.reasoning else None for _ in range(params.n)]
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    run = await open_run(state, ids, params, rid)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(_chat_stream(state, run, parsers, bool(req.logprobs), include_usage, rid, created),
                            run.close)
    if not await collect(run, request):
        return Response(status_code=499)  # the client left: nobody to answer
    choices = []
    for i, o in enumerate(run.out.outputs):
        message = {"role": "assistant", "content": o.text}
        if parsers[i] is not None:
            reasoning, content = parsers[i].parse(o.text)
            message = {"role": "assistant", "content": content, "reasoning_content": reasoning or None}
        logprobs = {"content": _chat_logprobs(state, o.token_ids, o.logprobs)} if req.logprobs else None
        choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": o.finish_reason})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                         "choices": choices, "usage": run.usage(), "system_fingerprint": None})


async def _chat_stream(state: ServerState, run: Run, parsers: list, logprobs: bool, include_usage: bool, rid: str,
                       created: int) -> AsyncIterator[str]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
            "system_fingerprint": None}
    if include_usage:
        head["usage"] = None

    def chunk(i: int, delta: dict, lps: list | None = None, finish: str | None = None) -> str:
        choice = {"index": i, "delta": delta, "logprobs": {"content": lps} if lps is not None else None,
                  "finish_reason": finish}
        return sse({**head, "choices": [choice]})

    def split(reasoning_and_content: tuple[str, str]) -> dict:
        reasoning, content = reasoning_and_content
        return ({"reasoning_content": reasoning} if reasoning else {}) | ({"content": content} if content else {})

    try:
        yield "".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(run.n))
        async with aclosing(run.updates()) as updates:
            async for update in updates:
                events = []
                for i, text, ids, lps in update:
                    delta = {"content": text} if parsers[i] is None else split(parsers[i].feed(text))
                    entries = _chat_logprobs(state, ids, lps) if logprobs and lps else None
                    if delta or entries:
                        events.append(chunk(i, delta, entries))
                if events:
                    yield "".join(events)
        events = []
        for i, o in enumerate(run.out.outputs):
            delta = split(parsers[i].finish()) if parsers[i] is not None else {}
            events.append(chunk(i, delta, None, o.finish_reason))
        if include_usage:
            events.append(sse({**head, "choices": [], "usage": run.usage()}))
        yield "".join(events) + "data: [DONE]\n\n"
    except APIError as e:  # the status line is sent already: the error goes in the stream
        yield sse(e.body()) + "data: [DONE]\n\n"


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
    run = await open_run(state, ids, params, rid)
    want_lp = req.logprobs is not None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventStream(_completion_stream(state, run, want_lp, include_usage, rid, created), run.close)
    if not await collect(run, request):
        return Response(status_code=499)
    choices = [{"index": i, "text": o.text, "finish_reason": o.finish_reason,
                "logprobs": _completion_logprobs(state, o.token_ids, o.logprobs, 0) if want_lp else None}
               for i, o in enumerate(run.out.outputs)]
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                         "choices": choices, "usage": run.usage(), "system_fingerprint": None})


async def _completion_stream(state: ServerState, run: Run, want_lp: bool, include_usage: bool, rid: str,
                             created: int) -> AsyncIterator[str]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "system_fingerprint": None}
    if include_usage:
        head["usage"] = None
    offsets = [0] * run.n

    def chunk(i: int, text: str, logprobs: dict | None = None, finish: str | None = None) -> str:
        return sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    try:
        async with aclosing(run.updates()) as updates:
            async for update in updates:
                events = []
                for i, text, ids, lps in update:
                    logprobs = _completion_logprobs(state, ids, lps, offsets[i]) if want_lp and lps else None
                    if logprobs:
                        offsets[i] += sum(len(t) for t in logprobs["tokens"])
                    events.append(chunk(i, text, logprobs))
                if events:
                    yield "".join(events)
        events = [chunk(i, "", None, o.finish_reason) for i, o in enumerate(run.out.outputs)]
        if include_usage:
            events.append(sse({**head, "choices": [], "usage": run.usage()}))
        yield "".join(events) + "data: [DONE]\n\n"
    except APIError as e:
        yield sse(e.body()) + "data: [DONE]\n\n"
