"""The OpenAI-compatible server, on loopback with real clients: the `openai` package for the API, raw httpx for
malformed requests, a 200-stream load test, a disconnect storm, and SIGTERM on the `mixr serve` command."""

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import start_mixr_serve

from mixr.engine.async_engine import AsyncLLM
from mixr.engine.llm_engine import CompletionOutput, EngineConfig, LLMEngine, RequestMetrics, RequestOutput
from mixr.reference import reference_generate
from mixr.safety import SafetyConfig, detect, token_entropy
from mixr.sampling import SamplingParams
from mixr.serve import build_app
from mixr.serve.reasoning import ReasoningParser
from mixr.tiny import make_tiny_checkpoint

MODEL = "tiny-r1"
USER = [{"role": "user", "content": "What is 12 times 3?"}]


# -- the reasoning parser, alone -------------------------------------------------------------------------------
PARSES = [  # (opened in the prompt, output, reasoning, content)
    (True, "Let me add.\n</think>\n\nIt is 5.", "Let me add.", "It is 5."),
    (True, "\nno answer yet", "no answer yet", ""),  # max_tokens hit inside the think block
    (True, "</think>just the answer", "", "just the answer"),
    (False, "<think>\nhmm</think>\n\nok <think>not reasoning</think>", "hmm", "ok <think>not reasoning</think>"),
    (False, "  \n<think>a < b </ c</think>b", "a < b </ c", "b"),
    (False, "plain answer </think>", "", "plain answer </think>"),
    (False, "<thi", "", "<thi"),  # an output cut inside a would-be tag is text
    (False, "\n\n", "", "\n\n"),
    (True, "x </thi", "x </thi", ""),
]


@pytest.mark.parametrize("opened, text, reasoning, content", PARSES)
def test_reasoning_parser_whole_and_every_split(opened, text, reasoning, content):
    assert ReasoningParser(opened).parse(text) == (reasoning, content)
    # The same pieces however the text arrives: cut at every pair of points, and one character at a time.
    cuts = [[i, j] for i in range(len(text) + 1) for j in range(i, len(text) + 1)] + [list(range(len(text) + 1))]
    for points in cuts:
        p, r, c = ReasoningParser(opened), "", ""
        for a, b in zip([0, *points], [*points, len(text)]):
            dr, dc = p.feed(text[a:b])
            r, c = r + dr, c + dc
        dr, dc = p.finish()
        assert (r + dr, c + dc) == (reasoning, content), points


def test_reasoning_parser_holds_back_only_what_could_be_a_tag():
    p = ReasoningParser(in_reasoning=True)
    assert p.feed("step one") == ("step one", "")
    assert p.feed(" and two\n</th") == (" and two", "")  # "\n</th" may be whitespace before the end tag
    assert p.feed("ink>") == ("", "")
    assert p.feed("\n\nThe answer") == ("", "The answer")
    assert p.feed(" is 4") == ("", " is 4")
    assert p.finish() == ("", "")


# -- a server on loopback --------------------------------------------------------------------------------------
@contextlib.contextmanager
def running(app):
    """uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def llm(model_dir):
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", config=EngineConfig(kv_cache_bytes=32 << 20))
    return AsyncLLM(engine)


@pytest.fixture(scope="module")
def url(llm):
    with running(build_app(llm, MODEL, api_key=None, max_queue=256)) as base:
        yield base


@pytest.fixture
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def engine_idle(llm, timeout: float = 10.0) -> bool:
    """Wait until the engine holds no request and every KV block is free."""
    engine, deadline = llm.engine, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.has_unfinished_requests() and \
                engine.scheduler.block_manager.num_free_blocks == engine.runner.num_blocks:
            return True
        time.sleep(0.02)
    return False


def metric(url: str, name: str) -> float:
    """One sample of /metrics; a labelled counter not yet seen is 0."""
    text = httpx.get(f"{url}/metrics").text
    values = [float(v) for n, v in re.findall(r"^(\S+) (\S+)$", text, re.M) if n == name]
    assert len(values) == 1 or ("{" in name and not values), f"{name} not in /metrics"
    return values[0] if values else 0.0


def reasoning_of(message) -> str | None:
    return (message.model_extra or {}).get("reasoning_content")


def prompt_ids(llm, messages) -> list[int]:
    return llm.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def expected_split(raw: str) -> tuple[str, str]:
    """The R1 template opens the think block: reasoning is the text before `</think>`, the answer after it."""
    reasoning, tag, content = raw.partition("</think>")
    return reasoning.strip(), content.lstrip()


# -- the API with the openai client ----------------------------------------------------------------------------
def test_models_and_health(client, url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{url}/health").status_code == 200


def test_chat_is_the_model_greedy_output_split_into_reasoning(client, llm):
    ids = prompt_ids(llm, USER)
    with torch.inference_mode():
        (greedy,) = reference_generate(llm.engine.model, [ids], 24)
    raw = llm.engine.tokenizer.decode(greedy)
    reasoning, content = expected_split(raw)

    kw = dict(model=MODEL, messages=USER, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert (reasoning_of(choice.message) or "", choice.message.content) == (reasoning, content)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 24, len(ids) + 24)

    # the stream carries the same split, in deltas
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    joined_r = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    joined_c = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (joined_r, joined_c) == (reasoning, content)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)

    # /v1/completions with the same token ids: the raw text, tags included
    comp = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.choices[0].text == raw and comp.usage.completion_tokens == 24


class ScriptedLLM:
    """An AsyncLLM stand-in whose output is fixed text pieces: the reasoning split end to end, with tags cut
    across deltas, independent of what a random model happens to say."""

    def __init__(self, real: AsyncLLM, pieces: list[str]):
        self.engine, self.pieces = real.engine, pieces

    async def generate(self, prompt, params, request_id):
        outs = [CompletionOutput(i) for i in range(params.n)]
        metrics = RequestMetrics(time.monotonic(), num_prompt_tokens=len(prompt))
        out = RequestOutput(request_id, list(prompt), outs, metrics)
        for k, piece in enumerate(self.pieces):
            await asyncio.sleep(0.001)
            for o in outs:
                o.text += piece
                o.token_ids.append(k)
            if k == len(self.pieces) - 1:
                for o in outs:
                    o.finish_reason = "stop"
                out.finished = True
            yield out


def test_reasoning_content_split_across_deltas(llm):
    pieces = ["Three", " twelves", " are 36.\n</th", "ink", ">\n\n", "12 × 3 = ", "36."]
    with running(build_app(ScriptedLLM(llm, pieces), MODEL)) as base, \
            openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0) as c:
        r = c.chat.completions.create(model=MODEL, messages=USER, n=2)
        for choice in r.choices:
            assert reasoning_of(choice.message) == "Three twelves are 36."
            assert choice.message.content == "12 × 3 = 36." and choice.finish_reason == "stop"
        reasoning, content = {0: "", 1: ""}, {0: "", 1: ""}
        for chunk in c.chat.completions.create(model=MODEL, messages=USER, n=2, stream=True):
            for ch in chunk.choices:
                d = ch.delta
                assert "</" not in (d.content or "") + ((d.model_extra or {}).get("reasoning_content") or "")
                reasoning[ch.index] += (d.model_extra or {}).get("reasoning_content") or ""
                content[ch.index] += d.content or ""
        assert reasoning == {0: "Three twelves are 36.", 1: "Three twelves are 36."}
        assert content == {0: "12 × 3 = 36.", 1: "12 × 3 = 36."}


class BrokenLLM(ScriptedLLM):
    """Refuses prompts containing "refuse" as AsyncLLM does (ValueError at once); otherwise fails mid-stream as a
    failed engine step does (RuntimeError after the first output)."""

    async def generate(self, prompt, params, request_id):
        if "refuse" in self.engine.tokenizer.decode(prompt):
            raise ValueError("sequence 7 may need 4096 KV blocks of 16 tokens but the cache has only 100")
        async for out in super().generate(prompt, params, request_id):
            yield out
            raise RuntimeError("engine step failed: RuntimeError('CUDA error: an illegal memory access')")


def test_engine_errors_map_to_openai_errors(llm):
    with running(build_app(BrokenLLM(llm, ["a", "b"]), MODEL)) as base, httpx.Client(base_url=base) as h:
        r = h.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "refuse"}]))
        assert r.status_code == 400 and "KV blocks" in r.json()["error"]["message"]
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "fail"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with h.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["type"] == "server_error" and events[-1] == "[DONE]"
        assert metric(base, "mixr_requests_in_flight") == 0 and h.get("/health").status_code == 200


def test_n_seed_and_stream_agree(client):
    kw = dict(model=MODEL, messages=USER, max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    full = [(reasoning_of(c.message) or "") + c.message.content for c in a.choices]
    assert full == [(reasoning_of(c.message) or "") + c.message.content for c in b.choices]  # seeded
    assert 3 <= a.usage.completion_tokens <= 30
    texts = {0: "", 1: "", 2: ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ((ch.delta.model_extra or {}).get("reasoning_content") or "") + (ch.delta.content or "")
    assert [texts[i] for i in range(3)] == full
    # completions, n > 1, seeded
    comp = client.completions.create(model=MODEL, prompt="Alice has", max_tokens=6, n=2, seed=1, temperature=0.8)
    assert len(comp.choices) == 2 and comp.usage.completion_tokens <= 12


def test_logprobs(client, llm):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == 8
    raw = b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace")
    assert expected_split(raw) == (reasoning_of(r.choices[0].message) or "", r.choices[0].message.content)
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                            stream=True, extra_body={"ignore_eos": True})
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    assert all(e.top_logprobs == [] for e in streamed)

    comp = client.completions.create(model=MODEL, prompt="Bob sees", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert "".join(lp.tokens) == comp.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_usage_counts_cached_prompt_tokens(client):
    long = [{"role": "system", "content": "You count things. " + "Carol finds 7 keys. " * 30},
            {"role": "user", "content": "How many keys does Carol have?"}]
    first = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    second = client.chat.completions.create(model=MODEL, messages=long, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 100
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 16 <= cached < first.usage.prompt_tokens and cached % 16 == 0

    chunks = list(client.chat.completions.create(model=MODEL, messages=long, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 3
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_stop_strings(client, llm):
    ids = prompt_ids(llm, USER)
    raw = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    stop = raw[len(raw) // 2:len(raw) // 2 + 2]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0, stop=[stop, "never"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == raw[:raw.index(stop)]


# -- bad input, auth, backpressure, metrics --------------------------------------------------------------------
def chat_body(**kw) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **kw}


LONG = [{"role": "user", "content": "Dave wants 3 eggs. " * 600}]  # > 2048 tokens
BAD = [  # (path, body, status, param, code)
    ("/v1/chat/completions", b"{not json", 400, None, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("/v1/chat/completions", b"", 400, None, None),
    ("/v1/chat/completions", {"messages": USER}, 400, "model", None),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", None),
    ("/v1/chat/completions", chat_body(messages=[]), 400, "messages", None),
    ("/v1/chat/completions", chat_body(messages="hi"), 400, "messages", None),
    ("/v1/chat/completions", chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", None),
    ("/v1/chat/completions", chat_body(messages=[{"content": "hi"}]), 400, "messages[0].role", None),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content", None),
    ("/v1/chat/completions", chat_body(model="gpt-4"), 404, "model", "model_not_found"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens", None),
    ("/v1/chat/completions", chat_body(max_tokens=-5), 400, "max_tokens", None),
    ("/v1/chat/completions", chat_body(max_tokens="5"), 400, "max_tokens", None),
    ("/v1/chat/completions", chat_body(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("/v1/chat/completions", chat_body(max_tokens=5000), 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", chat_body(messages=LONG), 400, "messages", "context_length_exceeded"),
    ("/v1/chat/completions", chat_body(n=0), 400, "n", None),
    ("/v1/chat/completions", chat_body(n=1.5), 400, "n", None),
    ("/v1/chat/completions", chat_body(temperature=2.5), 400, "temperature", None),
    ("/v1/chat/completions", chat_body(temperature=-0.1), 400, "temperature", None),
    ("/v1/chat/completions", chat_body(temperature="hot"), 400, "temperature", None),
    ("/v1/chat/completions", chat_body(top_p=1.5), 400, "top_p", None),
    ("/v1/chat/completions", chat_body(presence_penalty=3), 400, "presence_penalty", None),
    ("/v1/chat/completions", chat_body(stop=["ok", ""]), 400, "stop", None),
    ("/v1/chat/completions", chat_body(stop=5), 400, "stop", None),
    ("/v1/chat/completions", chat_body(seed=2**64), 400, "seed", None),
    ("/v1/chat/completions", chat_body(stream="yes"), 400, "stream", None),
    ("/v1/chat/completions", chat_body(top_logprobs=30, logprobs=True), 400, "top_logprobs", None),
    ("/v1/chat/completions", chat_body(top_logprobs=2), 400, "top_logprobs", None),
    ("/v1/chat/completions", chat_body(response_format={"type": "json_schema", "json_schema": {}}), 400,
     "response_format.type", None),
    ("/v1/chat/completions", chat_body(response_format={"type": "yaml"}), 400, "response_format.type", None),
    ("/v1/chat/completions", chat_body(response_format="json"), 400, "response_format", None),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None),
    ("/v1/chat/completions", chat_body(logit_bias={"5": 10}), 400, "logit_bias", None),
    ("/v1/chat/completions", chat_body(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 100000]}, 400, "prompt", None),
    ("/v1/completions", {"model": MODEL, "prompt": [5] * 2048}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "x"}, 400, "suffix", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1, "stream": True}, 400, "max_tokens", None),
]


def test_malformed_requests_get_openai_errors(url):
    with httpx.Client(base_url=url, timeout=30) as h:
        counter = 'mixr_requests_total{endpoint="/v1/chat/completions",status="400"}'
        before = metric(url, counter)
        for path, body, status, param, code in BAD:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.post(path, content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text
            assert err["type"] == "invalid_request_error" and (err["param"], err["code"]) == (param, code), (body, err)
        assert h.get("/v1/nowhere").status_code == 404 and h.get("/v1/nowhere").json()["error"]["type"]
        assert h.get("/v1/chat/completions").status_code == 405
        assert h.get("/v1/models/gpt-4").json()["error"]["code"] == "model_not_found"
        # still serving, nothing left behind
        ok = h.post("/v1/chat/completions", json=chat_body(response_format={"type": "json_object"}))
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
        n400 = sum(1 for path, _, status, _, _ in BAD if path == "/v1/chat/completions" and status == 400)
        assert metric(url, counter) == before + n400
        assert metric(url, "mixr_requests_in_flight") == 0


def test_api_key(llm, monkeypatch):
    with running(build_app(llm, MODEL, api_key="s3cret")) as base, httpx.Client(base_url=base) as h:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
                r = h.request(method, path, headers=headers, content=b"{bad json")
                assert r.status_code == 401, (headers, path)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["WWW-Authenticate"] == "Bearer"
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200
        with openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0) as good:
            assert good.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices
        with openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0) as bad, \
                pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_full_queue_answers_429(llm):
    with running(build_app(llm, MODEL, max_queue=1)) as base, httpx.Client(base_url=base, timeout=30) as h:
        long = {"model": MODEL, "prompt": "Erin buys", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with h.stream("POST", "/v1/completions", json=long) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # (kept: dropping the iterator would close the connection)
            assert next(lines).startswith("data: ")  # the first chunk: the request is in the engine
            r = h.post("/v1/chat/completions", json=chat_body())
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"]
            with openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0) as c, \
                    pytest.raises(openai.RateLimitError):
                c.completions.create(model=MODEL, prompt="x", max_tokens=1)
            assert metric(base, "mixr_requests_in_flight") == 1
        # the held stream was closed early: its request is aborted, and the slot is free again
        assert engine_idle(llm)
        assert h.post("/v1/chat/completions", json=chat_body()).status_code == 200


def test_metrics_follow_requests(client, url):
    names = ['mixr_requests_total{endpoint="/v1/completions",status="200"}', "mixr_generation_tokens_total",
             "mixr_prompt_tokens_total", "mixr_time_to_first_token_seconds_count",
             "mixr_e2e_request_latency_seconds_count"]
    before = {n: metric(url, n) for n in names}
    r = client.completions.create(model=MODEL, prompt="Grace has", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    after = {n: metric(url, n) for n in names}
    assert after[names[0]] == before[names[0]] + 1
    assert after["mixr_generation_tokens_total"] == before["mixr_generation_tokens_total"] + 4
    assert after["mixr_prompt_tokens_total"] == before["mixr_prompt_tokens_total"] + r.usage.prompt_tokens
    assert after["mixr_time_to_first_token_seconds_count"] == before["mixr_time_to_first_token_seconds_count"] + 1
    assert after["mixr_e2e_request_latency_seconds_count"] == before["mixr_e2e_request_latency_seconds_count"] + 1
    text = httpx.get(f"{url}/metrics").text
    for name in ("mixr_kv_cache_usage_ratio", "mixr_requests_in_flight", "mixr_sequences_running",
                 "mixr_sequences_waiting", 'mixr_time_to_first_token_seconds_bucket{le="+Inf"}'):
        assert re.search(rf"^{re.escape(name)} [0-9.e+-]+$", text, re.M), name


# -- load ------------------------------------------------------------------------------------------------------
def test_200_concurrent_streams_match_the_same_requests_alone(client, url, llm):
    prompts = [[{"role": "user", "content": f"How many {thing}s does {name} have?"}]
               for name in ("Alice", "Bob", "Carol", "Dave", "Erin") for thing in ("apple", "book", "cat", "dog")]
    kw = dict(model=MODEL, max_tokens=6, temperature=0, stream=True)

    def text_of(chunks) -> tuple[str, str, str]:
        deltas = [c.choices[0].delta for c in chunks]
        return ("".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas),
                "".join(d.content or "" for d in deltas), chunks[-1].choices[0].finish_reason)

    alone = [text_of(list(client.chat.completions.create(messages=m, **kw))) for m in prompts]

    async def storm():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60) as ac:
            async def one(i):
                stream = await ac.chat.completions.create(messages=prompts[i % len(prompts)], **kw)
                return text_of([c async for c in stream])
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 60)

    t = time.monotonic()
    results = asyncio.run(storm())
    took = time.monotonic() - t
    assert len(results) == 200
    assert [results[i] for i in range(200)] == [alone[i % len(prompts)] for i in range(200)]
    assert engine_idle(llm) and metric(url, "mixr_requests_in_flight") == 0
    print(f"200 concurrent streams in {took:.1f}s")


def test_disconnect_storm_frees_every_block(url, llm):
    aborts = metric(url, "mixr_request_aborts_total")
    body = {"model": MODEL, "max_tokens": 1000, "ignore_eos": True, "stream": True}

    async def storm():
        async with httpx.AsyncClient(base_url=url, timeout=30) as h:
            async def one(i):
                msgs = [{"role": "user", "content": f"Frank gives away {i} lamps."}]
                async with h.stream("POST", "/v1/chat/completions", json={**body, "messages": msgs}) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return  # leave after the first chunk: the connection is closed
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), 60)
            # a non-streaming request whose client gives up is aborted too
            with pytest.raises(httpx.ReadTimeout):
                await h.post("/v1/completions", json={"model": MODEL, "prompt": "Heidi", "max_tokens": 1500,
                                                      "ignore_eos": True}, timeout=1.0)

    asyncio.run(storm())
    assert engine_idle(llm, timeout=10), "aborted requests still hold KV blocks"
    assert metric(url, "mixr_request_aborts_total") == aborts + 51
    assert metric(url, "mixr_requests_in_flight") == 0 and metric(url, "mixr_kv_cache_usage_ratio") == 0


def test_the_event_loop_never_waits_for_an_engine_step(model_dir):
    """Adding, finishing and aborting requests hand messages to the engine thread: a slow step (a GPU step at
    large batch) holds up no other coroutine, and requests admitted together start together."""
    engine = LLMEngine(model_dir, device="cpu", dtype="float32", config=EngineConfig(kv_cache_bytes=16 << 20))
    step = engine.step

    def slow_step():
        time.sleep(0.25)
        return step()

    engine.step = slow_step
    llm = AsyncLLM(engine)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def main():
        gaps, first = [], []

        async def ticker():
            t = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - t)
                t = now

        async def one(i: int, leave: bool):
            t = time.perf_counter()
            async for out in llm.generate([5, 6, 7 + i], params):
                first.append(time.perf_counter() - t)
                if leave:
                    break  # closing the stream aborts the request
            return out

        tick = asyncio.ensure_future(ticker())
        outs = await asyncio.gather(*(one(i, leave=i % 2 == 1) for i in range(16)))
        tick.cancel()
        return gaps, first, outs

    gaps, first, outs = asyncio.run(main())
    assert max(gaps) < 0.1, f"the event loop stalled for {max(gaps):.3f}s"
    assert max(first) < 0.25 * 3.5, "requests admitted together did not start within a step or two of each other"
    assert all(o.finished and len(o.token_ids) == 3 for o in outs[::2])
    assert engine_idle(llm)


def test_async_llm_request_ids_and_abort(llm):
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def main():
        first = llm.generate([1, 2, 3], params, request_id="same")
        await anext(first)
        with pytest.raises(ValueError, match="already running"):  # the running one is not disturbed
            await anext(llm.generate([4, 5], params, request_id="same"))
        out = await anext(first)
        assert not out.finished
        llm.abort("same")
        with pytest.raises(RuntimeError, match="was aborted"):
            async for _ in first:
                pass

    asyncio.run(main())
    assert engine_idle(llm)


def test_stream_chunks_are_the_json_of_the_whole_object():
    """The streaming fast path (Chunks: the per-response fields serialized once) writes the bytes sse() writes
    for the whole object; line breaks that str.splitlines would split at are escaped."""
    from mixr.serve.state import Chunks, sse
    head = {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": 'a "model"\u2028', "usage": None}
    chunks = Chunks(head)
    pieces = ["", " plain", 'quote " back \\ slash', "new\nline\r\t\x00\x1f\x7f", "\x85 \u2028 \u2029",
              "é 中 😀", "</think>"]
    for i, text in enumerate(pieces):
        event = chunks.text(i % 3, text)
        assert event == sse({**head, "choices": [{"index": i % 3, "text": text, "logprobs": None,
                                                   "finish_reason": None}]})
        delta = {"reasoning_content": text, "content": text[::-1]}
        assert chunks.delta(i, delta) == sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                                   "finish_reason": None}]})
        assert event.endswith("\n\n") and len(event[:-2].splitlines()) == 1
        assert json.loads(event[6:])["choices"][0]["text"] == text


# -- the safety layer (mixr.safety, switched on per server) ----------------------------------------------------
REFUSAL = "I can't help with that request."
BLOCK_INPUT = {"keywords": {"weapons": ["pipe bomb"]}, "patterns": {"pii": [r"\b\d{3}-\d{2}-\d{4}\b"]},
               # a callable classifier keeps the decision deterministic (a model directory: test_safety.py)
               "classifier": lambda text: ("harassment", 0.97 if "idiot" in text else 0.01)}


@contextlib.contextmanager
def safe_server(llm, safety: dict, api_key: str | None = None):
    """A server on the shared engine with a SafetyConfig; yields (base URL, openai client)."""
    with running(build_app(llm, MODEL, api_key=api_key, safety=SafetyConfig.from_dict(safety))) as base, \
            openai.OpenAI(base_url=f"{base}/v1", api_key=api_key or "-", max_retries=0, timeout=60) as c:
        yield base, c


def extra(obj, name: str):
    return (obj.model_extra or {}).get(name)


def c_ids(llm, text: str) -> list[int]:
    return llm.engine.tokenizer.encode(text)


def test_blocked_prompt_gets_a_400_content_filter(llm):
    with safe_server(llm, {"filter": BLOCK_INPUT}) as (base, c), httpx.Client(base_url=base, timeout=30) as h:
        tokens = metric(base, "mixr_prompt_tokens_total")
        blocked = [("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "Build a PIPE BOMB"}]),
                    "messages"),
                   ("/v1/chat/completions", chat_body(messages=[{"role": "system", "content": "ssn 123-45-6789"},
                                                                {"role": "user", "content": "hi"}]), "messages"),
                   ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "you idiot"}],
                                                      stream=True), "messages"),
                   ("/v1/completions", {"model": MODEL, "prompt": "a pipe bomb is"}, "prompt"),
                   ("/v1/completions", {"model": MODEL, "prompt": c_ids(llm, "my SSN: 123-45-6789")}, "prompt")]
        for path, body, param in blocked:
            r = h.post(path, json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json() == {"error": {"message": REFUSAL, "type": "invalid_request_error", "param": param,
                                          "code": "content_filter"}}
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "you idiot"}], max_tokens=2)
        assert e.value.status_code == 400 and e.value.code == "content_filter"
        # nothing blocked reached the engine; the rest is served as before
        assert metric(base, "mixr_prompt_tokens_total") == tokens
        assert metric(base, 'mixr_content_filter_total{stage="input"}') == len(blocked) + 1
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "you are kind"}], max_tokens=2)
        assert r.choices[0].finish_reason == "length" and metric(base, "mixr_requests_in_flight") == 0


def test_refusal_mode_answers_with_the_refusal(llm):
    msg = "Sorry, that is not something I can help with."
    cfg = {"filter": {**BLOCK_INPUT, "mode": "refusal", "refusal_message": msg}}
    bad = [{"role": "user", "content": "how to build a pipe bomb"}]
    with safe_server(llm, cfg) as (base, c):
        tokens = metric(base, "mixr_prompt_tokens_total")
        r = c.chat.completions.create(model=MODEL, messages=bad, n=2)
        assert [(ch.index, ch.message.content, ch.finish_reason) for ch in r.choices] == \
            [(0, msg, "content_filter"), (1, msg, "content_filter")]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids(llm, bad)), 0)
        chunks = list(c.chat.completions.create(model=MODEL, messages=bad, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "content_filter"
        assert chunks[-1].usage.completion_tokens == 0 and chunks[0].choices[0].delta.role == "assistant"
        comp = c.completions.create(model=MODEL, prompt="my SSN is 123-45-6789")
        assert (comp.choices[0].text, comp.choices[0].finish_reason) == (msg, "content_filter")
        chunks = list(c.completions.create(model=MODEL, prompt="you idiot", stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == msg
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert metric(base, "mixr_prompt_tokens_total") == tokens  # the engine never saw them
        ok = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
        assert ok.choices[0].finish_reason == "length" and ok.usage.completion_tokens == 3


def boundary_pattern(llm, client) -> tuple[list[dict], str, str, int, int]:
    """A prompt whose greedy output starts with k >= 2 whole printable-ASCII tokens and then a piece of text of
    3 or 4 characters that spans the boundary of tokens k and k+1 and first occurs there (a random model's
    output is mostly partial UTF-8; ASCII keeps token and character boundaries plain).
    Returns (messages, raw output, piece, its offset, k)."""
    for question in ("Bob sees 4 cats.", "What is 12 times 3?", "Hi", "Tell me a story.", "Count to ten."):
        messages = [{"role": "user", "content": question}]
        r = client.completions.create(model=MODEL, prompt=prompt_ids(llm, messages), max_tokens=40, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True})
        raw, pieces = r.choices[0].text, r.choices[0].logprobs.tokens
        for k in range(2, len(pieces) - 1):
            if not all(p.isascii() and p.isprintable() for p in pieces[:k + 2]):
                break
            at = len("".join(pieces[:k + 1]))
            piece = pieces[k][-2:] + pieces[k + 1][:2]
            if len(piece) >= 3 and raw.startswith("".join(pieces[:k + 2])) and raw.index(piece) == at - 2:
                return messages, raw, piece, raw.index(piece), k
    pytest.fail("no greedy output starts with a blockable token boundary")


def test_output_filter_stops_streams_across_token_boundaries(llm, client):
    messages, raw, piece, start, k = boundary_pattern(llm, client)
    ids = prompt_ids(llm, messages)
    cfg = {"filter": {"patterns": {"secret": [{"regex": re.escape(piece), "max_len": len(piece)}]}}}
    with safe_server(llm, cfg) as (base, c):
        aborts = metric(base, "mixr_request_aborts_total")
        kw = dict(model=MODEL, messages=messages, max_tokens=1500, temperature=0, extra_body={"ignore_eos": True})
        chunks = list(c.chat.completions.create(**kw, stream=True, logprobs=True,
                                                stream_options={"include_usage": True}))
        # the KV blocks are free by the time [DONE] arrives: the engine request was aborted
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.runner.num_blocks
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        reasoning = "".join(extra(d, "reasoning_content") or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        assert (reasoning, content) == ReasoningParser(True).parse(raw[:start])  # all before the match
        assert all(piece not in (extra(d, "reasoning_content") or "") + (d.content or "") for d in deltas)
        finals = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert [f.finish_reason for f in finals] == ["content_filter"]
        usage = chunks[-1].usage
        assert k + 1 <= usage.completion_tokens < k + 60  # stopped right away, not at max_tokens
        # logprobs are released with their text only: exactly the k tokens wholly before the match
        entries = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
        assert "".join(e.token for e in entries) == raw[:start][:at_token(raw, entries)] and len(entries) == k
        # the audit covers the tokens up to the stop (the engine may have run a step further before the abort),
        # and its spans never show the blocked text
        audit = extra(finals[0], "mixr_audit")
        assert k + 1 <= audit["num_tokens"] <= usage.completion_tokens
        assert all(piece not in s["text"] for s in audit["spans"])

        # not streamed: the same cut, from /v1/completions
        r = c.completions.create(model=MODEL, prompt=ids, max_tokens=1500, temperature=0, logprobs=1,
                                 extra_body={"ignore_eos": True})
        assert (r.choices[0].text, r.choices[0].finish_reason) == (raw[:start], "content_filter")
        assert len(r.choices[0].logprobs.tokens) == k and raw.startswith("".join(r.choices[0].logprobs.tokens))
        assert r.usage.completion_tokens < k + 60
        # n > 1: every choice is cut (greedy: the same text); the request ends when none is left running
        r = c.chat.completions.create(**kw, n=2)
        assert [(ch.finish_reason, (reasoning_of(ch.message) or "", ch.message.content)) for ch in r.choices] == \
            [("content_filter", ReasoningParser(True).parse(raw[:start]))] * 2
        assert engine_idle(llm, timeout=1)
        assert metric(base, 'mixr_content_filter_total{stage="output"}') == 4
        assert metric(base, "mixr_request_aborts_total") == aborts  # the server's own stop is not a client abort
        # text without the pattern passes untouched
        other = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                          temperature=0)
        assert other.choices[0].finish_reason in ("length", "stop")


def at_token(raw: str, entries) -> int:
    return len("".join(e.token for e in entries))


def test_audit_field_matches_the_logprobs(llm, client, url):
    ids = prompt_ids(llm, USER)
    kw = dict(model=MODEL, messages=USER, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**kw)
    body = {"model": MODEL, "messages": USER, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    assert set(httpx.post(f"{url}/v1/chat/completions", json=body).json()["choices"][0]) == \
        {"index", "message", "logprobs", "finish_reason"}  # no safety config: no extension field
    threshold = 0.05
    with safe_server(llm, {"audit": {"prob_threshold": threshold, "max_spans": 3}}) as (_, c):
        r = c.chat.completions.create(**kw, logprobs=True, top_logprobs=20)
        (choice,) = r.choices
        # safety on, nothing blocked: the output is the plain server's
        assert (choice.message.content, reasoning_of(choice.message)) == \
            (plain.choices[0].message.content, reasoning_of(plain.choices[0].message))
        audit, entries = extra(choice, "mixr_audit"), choice.logprobs.content
        assert audit["num_tokens"] == len(entries) == r.usage.completion_tokens == 16
        steps = [(e.logprob, [(j, t.logprob) for j, t in enumerate(e.top_logprobs)]) for e in entries]
        ent = [token_entropy(None, s) for s in steps]  # greedy: the chosen token is the first alternative
        assert audit["mean_entropy"] == pytest.approx(sum(ent) / 16, rel=1e-9)
        assert audit["max_entropy"] == pytest.approx(max(ent), rel=1e-9)
        assert audit["mean_logprob"] == pytest.approx(sum(e.logprob for e in entries) / 16, rel=1e-9)
        low = [e.logprob < math.log(threshold) for e in entries]
        assert audit["low_prob_fraction"] == sum(low) / 16
        assert len(audit["spans"]) == min(3, sum(1 for j in range(16) if low[j] and (j == 0 or not low[j - 1])))
        for s in audit["spans"]:
            span = entries[s["token_start"]:s["token_end"]]
            assert all(low[s["token_start"]:s["token_end"]]) and span
            assert s["logprob"] == pytest.approx(sum(e.logprob for e in span), rel=1e-9)
            assert s["min_prob"] == pytest.approx(math.exp(min(e.logprob for e in span)), rel=1e-9)
        assert audit["low_confidence"] == bool(audit["reasons"])

        # the engine is asked for logprobs for the audit; the client gets only what it asked for
        bare = c.chat.completions.create(**kw)
        assert bare.choices[0].logprobs is None and extra(bare.choices[0], "mixr_audit") == audit
        two = c.chat.completions.create(**kw, logprobs=True, top_logprobs=2)
        assert [len(e.top_logprobs) for e in two.choices[0].logprobs.content] == [2] * 16
        assert extra(two.choices[0], "mixr_audit") == audit
        chunks = list(c.chat.completions.create(**kw, stream=True))
        assert all(ch.choices[0].logprobs is None for ch in chunks)
        assert [extra(ch.choices[0], "mixr_audit") for ch in chunks if ch.choices[0].finish_reason] == [audit]
        comp = c.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
        assert comp.choices[0].logprobs is None and extra(comp.choices[0], "mixr_audit") == audit
    with safe_server(llm, {"audit": {"enabled": False}}) as (_, c):
        assert extra(c.chat.completions.create(**kw).choices[0], "mixr_audit") is None


def test_audit_log_lines_and_no_api_key(llm, tmp_path):
    path = tmp_path / "audit" / "log.jsonl"
    key, wm_key = "sk-mixr-test-0123456789abcdef", "wm-secret-5f3a9c"
    cfg = {"filter": {"keywords": {"weapons": ["pipe bomb"]}}, "audit": {"log_path": str(path)},
           "watermark": {"key": wm_key, "delta": 1.0}}
    with safe_server(llm, cfg, api_key=key) as (base, c):
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"my key is {key}"}],
                                      max_tokens=5, extra_body={"ignore_eos": True})
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a pipe bomb"}])
        chunks = list(c.completions.create(model=MODEL, prompt="Alice has", max_tokens=4, stream=True,
                                           extra_body={"ignore_eos": True}))
        with httpx.Client(base_url=base) as h:  # a client sending its key in other headers too
            assert h.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                          headers={"Authorization": f"Bearer {key}", "X-Api-Key": key}).status_code == 200
    lines = path.read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == 4 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for rec in recs:
        assert set(rec) == {"request_id", "time", "model", "filter", "audit", "metadata"} and rec["model"] == MODEL
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"])
        assert rec["filter"][0]["stage"] == "input" and rec["metadata"]["watermarked"] is True
    ok, blocked, streamed, last = recs
    assert ok["request_id"] == r.id and ok["filter"] == [{"stage": "input", "allowed": True, "category": None,
                                                          "rule": None, "message": None, "score": None}]
    assert ok["metadata"] == {"endpoint": "/v1/chat/completions", "stream": False, "watermarked": True,
                              "finish_reasons": ["length"], "prompt_tokens": r.usage.prompt_tokens,
                              "completion_tokens": 5}
    assert len(ok["audit"]) == 1 and ok["audit"][0]["num_tokens"] == 5
    assert blocked["request_id"].startswith("chatcmpl-") and blocked["audit"] is None
    assert (blocked["filter"][0]["allowed"], blocked["filter"][0]["category"], blocked["filter"][0]["rule"]) == \
        (False, "weapons", "keyword:pipe bomb")
    assert blocked["metadata"]["finish_reasons"] == ["content_filter"]
    assert streamed["request_id"] == chunks[0].id and streamed["metadata"]["stream"] is True
    assert streamed["audit"][0]["num_tokens"] == 4 and last["metadata"]["endpoint"] == "/v1/completions"
    text = path.read_text()
    for secret in (key, wm_key, "Authorization", "Bearer", "X-Api-Key"):
        assert secret not in text


def test_watermark_from_the_server_config_is_detected(llm, client):
    tok = llm.engine.tokenizer
    kw = dict(model=MODEL, prompt="Alice has", max_tokens=200, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    with safe_server(llm, {"watermark": {"key": "server-wm", "delta": 4.0}}) as (_, c):
        marked = c.completions.create(**kw).choices[0].text
        chat = c.chat.completions.create(model=MODEL, messages=USER, max_tokens=200, temperature=1.0, seed=5,
                                         extra_body={"ignore_eos": True}).choices[0].message
    d = detect(marked, tok, key="server-wm")
    assert d.z_score > 4 and d.verdict == "watermarked" and d.num_tokens_scored > 100
    assert abs(detect(plain, tok, key="server-wm").z_score) < 3  # the same request without the watermark
    assert abs(detect(marked, tok, key="another-key").z_score) < 3
    assert detect((reasoning_of(chat) or "") + chat.content, tok, key="server-wm").z_score > 4


def test_cli_safety_flags(model_dir, tmp_path):
    (tmp_path / "safety.toml").write_text('[filter]\nkeywords = {weapons = ["pipe bomb"]}\n'
                                          '[watermark]\nkey = "from-the-file"\ndelta = 4.0\n')
    log = tmp_path / "audit.jsonl"
    env = {"MIXR_WATERMARK_KEY": "from-the-env"}
    args = [str(model_dir), "--device", "cpu", "--served-model-name", "m"]
    proc, base, out = start_mixr_serve(
        args + ["--safety-config", str(tmp_path / "safety.toml"), "--audit-log", str(log)], tmp_path / "server.log",
        env=env)
    try:
        r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "a pipe bomb"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
        r = httpx.post(f"{base}/v1/completions", json={"model": "m", "prompt": "Alice has", "max_tokens": 200,
                                                       "seed": 1, "ignore_eos": True}, timeout=60).json()
        assert r["choices"][0]["mixr_audit"]["num_tokens"] == 200
    finally:
        proc.terminate()
        proc.wait(30)
        out.close()
    from mixr.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(model_dir)
    text = r["choices"][0]["text"]
    # the environment's key replaces the file's; the file's gamma/delta stay
    assert detect(text, tok, key="from-the-env").z_score > 4 and abs(detect(text, tok, key="from-the-file").z_score) < 4
    assert [json.loads(line)["filter"][0]["allowed"] for line in log.read_text().splitlines()] == [False, True]
    bad = subprocess.run([sys.executable, "-m", "mixr", "serve", *args, "--safety-config", str(tmp_path / "nope.yaml")],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), **env}, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr and "Traceback" not in bad.stderr


# -- the command, and SIGTERM ----------------------------------------------------------------------------------
def test_import_mixr_does_not_import_the_server():
    code = "import sys, mixr; assert not any(m in sys.modules for m in ('fastapi', 'uvicorn', 'mixr.serve'))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], timeout=60)


@pytest.mark.parametrize("shutdown_timeout, max_tokens, finishes", [(20, 400, True), (0.5, 2000, False)])
def test_mixr_serve_drains_on_sigterm(model_dir, tmp_path, shutdown_timeout, max_tokens, finishes):
    """SIGTERM closes the listening socket; the stream in flight finishes, or is cut once the timeout passes."""
    proc, base, log = start_mixr_serve(
        [str(model_dir), "--device", "cpu", "--dtype", "float32", "--max-num-seqs", "8", "--served-model-name", "m",
         "--shutdown-timeout", str(shutdown_timeout)], tmp_path / "server.log", env={"MIXR_API_KEY": "k"})
    try:
        headers = {"Authorization": "Bearer k"}
        body = {"model": "m", "prompt": "Ivan", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        rest = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    httpx.get(f"{base}/health", timeout=1)
                except httpx.ConnectError:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the server still accepts connections after SIGTERM")
            with contextlib.suppress(httpx.RemoteProtocolError):  # a cut stream ends mid-body
                rest += [x for x in lines if x]
        assert proc.wait(30) in (0, -signal.SIGTERM)
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        if finishes:
            assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
            assert sum(1 for e in events if e["choices"] and e["choices"][0]["text"]) > 100
        else:
            assert "data: [DONE]" not in rest and all(e["choices"][0]["finish_reason"] is None for e in events)
            log.seek(0)
            assert "timeout graceful shutdown exceeded" in log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
