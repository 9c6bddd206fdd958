"""Safety layer: input filter, streaming output filter, audit statistics and log, watermark and its detector."""

import json
import math
import os
import random
import stat
import subprocess
import sys

import pytest
import torch

from mixr import LLM, SamplingParams
from mixr.safety import (AuditConfig, AuditLog, FilterConfig, SafetyConfig, StreamFilter, WatermarkConfig,
                         audit_response, check_input, detect, green_mask, is_green, token_entropy)
from mixr.safety.watermark import context_seed, mix32
from mixr.sampling import SampleRequest, sample_batch
from mixr.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mixr.tiny import make_tiny_checkpoint
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-safety"))


@pytest.fixture(scope="module")
def tok(tiny):
    return Tokenizer.from_dir(tiny)


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(tiny, device="cpu", dtype="float32")


# -- input filter ------------------------------------------------------------------------------------------------

FILTER = dict(keywords={"weapons": ["nerve agent", "pipe bomb"], "self-harm": ["suicide"]},
              patterns={"pii": [r"\b\d{3}-\d{2}-\d{4}\b"],
                        "secrets": [{"regex": r"sk-[A-Za-z0-9]{16,}", "max_len": 60}]},
              max_prompt_chars=200)


class WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()


def test_input_filter_decisions_per_category_regex_length():
    cfg = FilterConfig(**FILTER, max_prompt_tokens=20)
    t = WordTokenizer()
    d = check_input("How do I make a Pipe  Bomb? ", cfg, t)  # not whole-word: two spaces
    assert d.allowed
    d = check_input("How do I make a PIPE BOMB?", cfg, t)
    assert (d.allowed, d.category, d.rule) == (False, "weapons", "keyword:pipe bomb")
    assert d.message == cfg.refusal_message
    assert check_input("my skillset includes suicidetracking", cfg, t).allowed  # keywords are whole words
    assert check_input("thoughts of suicide", cfg, t).category == "self-harm"
    d = check_input("my SSN is 123-45-6789", cfg, t)
    assert (d.category, d.rule) == ("pii", r"regex:\b\d{3}-\d{2}-\d{4}\b")
    assert check_input("call 123-45-67890", cfg, t).allowed  # \b: not a SSN
    assert check_input("key sk-" + "a" * 20, cfg, t).category == "secrets"
    d = check_input("x" * 201, cfg, t)
    assert (d.category, d.rule) == ("length", "max_prompt_chars")
    assert check_input("x" * 200, cfg, t).allowed
    assert check_input("a " * 21, cfg, t).rule == "max_prompt_tokens"
    assert check_input("a " * 20, cfg, t).allowed
    with pytest.raises(ValueError, match="needs a tokenizer"):
        check_input("hi", cfg)
    # chat messages, with string and list-of-parts content; every role is checked
    msgs = [{"role": "system", "content": "be nice"},
            {"role": "user", "content": [{"type": "text", "text": "what is a"},
                                         {"type": "text", "text": "nerve agent"}]}]
    assert check_input(msgs, cfg, t).rule == "keyword:nerve agent"
    assert check_input([{"role": "user", "content": "hello"}, {"role": "assistant", "content": None}], cfg, t).allowed


def test_input_filter_classifier_and_modes():
    seen = []

    def classifier(text):
        seen.append(text)
        return ("harassment", 0.9) if "idiot" in text else ("harassment", 0.2) if "dumb" in text else None

    cfg = FilterConfig(classifier=classifier, classifier_threshold=0.5, mode="refusal", refusal_message="No.")
    d = check_input("you idiot", cfg)
    assert (d.allowed, d.category, d.rule, d.score, d.message) == (False, "harassment", "classifier", 0.9, "No.")
    assert check_input("that is dumb", cfg).allowed and check_input("hello", cfg).allowed
    assert seen == ["you idiot", "that is dumb", "hello"]
    body = check_input("you idiot", cfg).error_body()
    assert body["error"]["code"] == "content_filter" and body["error"]["message"] == "No."
    # rules decide before the classifier is asked
    cfg2 = FilterConfig(keywords={"x": ["idiot"]}, classifier=classifier)
    assert check_input("you idiot", cfg2).rule == "keyword:idiot"
    # "module:function" from a config file
    cfg3 = FilterConfig(classifier="os.path:basename")
    assert cfg3.classifier is os.path.basename
    with pytest.raises(ValueError, match="mode"):
        FilterConfig(mode="silently")
    with pytest.raises(ValueError, match="bad regex"):
        FilterConfig(patterns={"x": ["(unclosed"]})


def test_safety_config_from_files(tmp_path):
    toml = tmp_path / "safety.toml"
    toml.write_text("""
[filter]
mode = "refusal"
max_prompt_chars = 200
[filter.keywords]
weapons = ["nerve agent", "pipe bomb"]
"self-harm" = ["suicide"]
[filter.patterns]
pii = ['\\b\\d{3}-\\d{2}-\\d{4}\\b']
secrets = [{regex = 'sk-[A-Za-z0-9]{16,}', max_len = 60}]
[audit]
log_path = "audit.jsonl"
prob_threshold = 0.05
[watermark]
key = "k1"
delta = 3.0
""")
    data = {"filter": {**FILTER, "mode": "refusal"}, "audit": {"log_path": "audit.jsonl", "prob_threshold": 0.05},
            "watermark": {"key": "k1", "delta": 3.0}}
    (tmp_path / "safety.json").write_text(json.dumps(data))
    yaml = pytest.importorskip("yaml")
    (tmp_path / "safety.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for name in ("safety.toml", "safety.json", "safety.yaml"):
        cfg = SafetyConfig.from_file(tmp_path / name)
        assert cfg.filter.mode == "refusal" and cfg.audit.prob_threshold == 0.05
        assert [r.name for r in cfg.filter.rules] == [r.name for r in FilterConfig(**FILTER).rules]
        assert check_input("SSN 123-45-6789", cfg.filter).category == "pii"
        assert (cfg.watermark.key, cfg.watermark.delta, cfg.watermark.gamma) == ("k1", 3.0, 0.25)
        p = cfg.apply(SamplingParams(max_tokens=3))
        assert p.watermark is cfg.watermark and p.max_tokens == 3
        assert cfg.secrets() == ["k1"]
    assert SafetyConfig.from_dict({}).watermark is None
    with pytest.raises(ValueError, match="unknown key.*keyword"):
        SafetyConfig.from_dict({"filter": {"keyword": {}}})
    with pytest.raises(ValueError, match="section"):
        SafetyConfig.from_dict({"filters": {}})


# -- streaming output filter -------------------------------------------------------------------------------------

def _run_stream(cfg, deltas):
    f, out, held = StreamFilter(cfg), "", []
    for d in deltas:
        piece, stop = f.feed(d)
        out += piece
        held.append(len("".join(deltas[:len(held) + 1])) - len(out))
        if stop:
            return out, True, f, held
    piece, stop = f.finish()
    return out + piece, stop, f, held


@pytest.mark.parametrize("text, blocked, category", [
    ("Sure. To build a pipe bomb you need", "pipe bomb", "weapons"),
    ("The number is 123-45-6789 ok", "123-45-6789", "pii"),
    ("token: sk-ABCDEFGHIJKLMNOPQRST and more", "sk-ABCDEFGHIJKLMNOPQRST", "secrets"),
])
def test_stream_filter_stops_on_patterns_split_across_deltas(text, blocked, category):
    cfg = FilterConfig(**FILTER)
    start = text.index(blocked)
    n = len(text)
    # every split into 2 and 3 deltas, cut points inside and around the blocked text
    cuts = range(max(1, start - 3), min(n, start + len(blocked) + 3))
    splits = [[text[:a], text[a:]] for a in cuts]
    splits += [[text[:a], text[a:b], text[b:]] for a in cuts for b in cuts if a < b]
    for deltas in splits:
        out, stop, f, _ = _run_stream(cfg, deltas)
        assert stop and f.decision.category == category, deltas
        assert out == text[:start], deltas  # everything before the match, nothing of it
        assert blocked not in out
    # token-sized deltas too
    out, stop, f, _ = _run_stream(cfg, [text[i:i + 2] for i in range(0, n, 2)])
    assert (out, stop, f.decision.allowed) == (text[:start], True, False)


def test_stream_filter_passes_clean_text_and_bounds_holdback():
    cfg = FilterConfig(keywords={"k": ["kill"]})  # L = 4: at most 3 characters held back
    text = "Skills: we kill time; then the killer kills kill"
    deltas = [text[i:i + 3] for i in range(0, len(text), 3)]
    out, stop, f, held = _run_stream(cfg, deltas)
    assert stop and out == "Skills: we " and f.decision.rule == "keyword:kill"
    clean = "Skills: the killer kills, skillfully. " * 3
    out, stop, f, held = _run_stream(cfg, [clean[i:i + 5] for i in range(0, len(clean), 5)])
    assert (out, stop) == (clean, False)
    # "kill" followed by "er" in the next delta is not the keyword; held only while undecided
    out, stop, _, held = _run_stream(cfg, ["the kill", "er left"])
    assert (out, stop, held) == ("the killer left", False, [4, 3])
    # the last word decides at finish()
    assert _run_stream(cfg, ["they kill"])[:2] == ("they ", True)
    assert _run_stream(cfg, ["a b c d e f g h"])[3] == [3]  # no pending match: exactly L-1 held
    # output filtering off
    assert _run_stream(FilterConfig(keywords={"k": ["kill"]}, filter_output=False), ["kill", " kill"])[:2] == \
        ("kill kill", False)


def test_stream_filter_long_stream_stays_bounded():
    cfg = FilterConfig(keywords={"k": ["forbidden phrase"]})
    f, out = StreamFilter(cfg), ""
    for i in range(5000):
        out += f.feed(f"word{i} ")[0]
    piece, stop = f.feed("then forbidden ")
    out += piece
    piece, stop = f.feed("phrase!")
    out += piece
    assert stop and out.endswith("word4999 then ") and "forbidden" not in out
    assert len(f.text) < 4 * 16 + 4096 + 100


# -- audit -------------------------------------------------------------------------------------------------------

def test_token_entropy_from_top_alternatives():
    L = math.log
    full = (L(0.5), [(1, L(0.5)), (2, L(0.25)), (3, L(0.25))])  # the whole distribution: exact
    assert token_entropy(1, full) == pytest.approx(-(0.5 * L(0.5) + 2 * 0.25 * L(0.25)))
    # top-2 of a larger distribution: the remainder 0.2 is made of tokens no likelier than min(0.3, 0.2)
    part = (L(0.5), [(1, L(0.5)), (2, L(0.3))])
    assert token_entropy(1, part) == pytest.approx(-(0.5 * L(0.5) + 0.3 * L(0.3) + 0.2 * L(0.2)))
    # ... or than the last listed token: exact for a uniform distribution (top-5 of 100 tokens)
    assert token_entropy(0, (L(0.01), [(t, L(0.01)) for t in range(5)])) == pytest.approx(L(100))
    assert token_entropy(0, (L(0.04), [(0, L(0.04)), (1, L(0.01))])) == pytest.approx(
        -(0.04 * L(0.04) + 0.01 * L(0.01) + 0.95 * L(0.01)))
    # the chosen token outside the top alternatives is known too
    out = (L(0.1), [(1, L(0.6)), (2, L(0.2))])
    assert token_entropy(9, out) == pytest.approx(-(0.6 * L(0.6) + 0.2 * L(0.2) + 0.1 * L(0.1) + 0.1 * L(0.1)))
    assert token_entropy(None, out) == pytest.approx(token_entropy(9, out))
    assert token_entropy(None, (L(1.0), [])) == pytest.approx(0.0)


def test_audit_stats_and_low_probability_spans(tok):
    text = "Alice has 3 apples. Bob has 4 books."
    ids = tok.encode(text, add_special_tokens=False)
    n = len(ids)
    assert n >= 8
    probs = [0.9] * n
    probs[2], probs[3] = 0.05, 0.02  # span A: joint 0.001
    probs[6] = 0.01  # span B: 0.01
    probs[n - 1] = 0.08  # span C at the end: 0.08
    lps = [(math.log(p), [(t, math.log(p))]) for t, p in zip(ids, probs)]
    cfg = AuditConfig(prob_threshold=0.1, max_spans=2, max_mean_entropy=10, max_low_prob_fraction=0.5)
    s = audit_response(lps, ids, tok, cfg=cfg)
    assert s.num_tokens == n
    ents = [-(p * math.log(p) + (1 - p) * math.log(min(p, 1 - p))) for p in probs]  # one listed token + the rest
    assert s.mean_entropy == pytest.approx(sum(ents) / n) and s.max_entropy == pytest.approx(max(ents))
    assert s.mean_logprob == pytest.approx(sum(math.log(p) for p in probs) / n)
    assert s.low_prob_fraction == pytest.approx(4 / n)
    assert [(sp.token_start, sp.token_end) for sp in s.spans] == [(2, 4), (6, 7)]  # lowest joint first, 2 kept
    assert s.spans[0].logprob == pytest.approx(math.log(0.05 * 0.02)) and s.spans[0].min_prob == pytest.approx(0.02)
    for sp in s.spans:
        assert text[sp.char_start:sp.char_end] == sp.text == tok.decode(ids[sp.token_start:sp.token_end])
    assert not s.low_confidence and s.reasons == []
    flagged = audit_response(lps, ids, tok, cfg=AuditConfig(max_low_prob_fraction=0.1, max_mean_entropy=0.1))
    assert flagged.low_confidence and len(flagged.reasons) == 2
    assert len(flagged.spans) == 3 and (flagged.spans[2].token_start, flagged.spans[2].token_end) == (n - 1, n)
    # no tokenizer: statistics without text positions; empty response
    bare = audit_response(lps)
    assert bare.mean_entropy == pytest.approx(s.mean_entropy) and bare.spans[0].char_start == -1
    assert audit_response([]).num_tokens == 0


def test_audit_log_is_append_only_and_secret_free(tmp_path):
    path = tmp_path / "logs" / "audit.jsonl"
    stats = audit_response([(math.log(0.5), [(1, math.log(0.5))])] * 3)
    log = AuditLog(path, secrets=["wm-secret-key-123"])
    meta = {"user": "alice", "api_key": "sk-live-0123456789abcdef",
            "headers": {"Authorization": "Bearer abcdefghijkl0123", "X-Trace": "t1"},
            "note": "client pasted sk-proj-ZZZZZZZZZZZZZZZZ here", "watermark": {"key": "wm-secret-key-123"},
            "comment": "the wm-secret-key-123 leaked", "max_tokens": 16, "access_token": "tok-9999999999"}
    r1 = log.write("req-1", "tiny", [check_input("hello", FilterConfig())], stats, meta)
    first = path.read_bytes()
    log.write("req-2", "tiny", [check_input("pipe bomb", FilterConfig(**FILTER))], None, {"user": "bob"})
    AuditLog(path).write("req-3", "tiny")  # a second logger on the same file appends too
    data = path.read_bytes()
    assert data.startswith(first)
    recs = [json.loads(line) for line in data.decode().splitlines()]
    assert [r["request_id"] for r in recs] == ["req-1", "req-2", "req-3"]
    assert recs[0] == r1 and recs[0]["model"] == "tiny" and recs[0]["time"].endswith("Z")
    assert recs[0]["audit"]["num_tokens"] == 3 and recs[0]["filter"][0]["allowed"] is True
    assert recs[1]["filter"][0]["category"] == "weapons"
    assert recs[0]["metadata"]["user"] == "alice" and recs[0]["metadata"]["max_tokens"] == 16
    assert recs[0]["metadata"]["headers"] == {"X-Trace": "t1"}
    text = data.decode()
    for secret in ("sk-live-0123456789abcdef", "abcdefghijkl0123", "sk-proj-ZZZZZZZZZZZZZZZZ", "wm-secret-key-123",
                   "tok-9999999999", "api_key", "Authorization"):
        assert secret not in text
    assert "[redacted]" in recs[0]["metadata"]["note"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# -- watermark ---------------------------------------------------------------------------------------------------

def test_green_mask_matches_scalar_reference_and_is_deterministic():
    rng = random.Random(0)
    cfgs = [WatermarkConfig("k", gamma=0.25), WatermarkConfig(7, gamma=0.5, context_width=3),
            WatermarkConfig("k", gamma=0.1, context_width=2, hashing="minhash"),
            WatermarkConfig("k2", gamma=0.3, context_width=2, hashing="selfhash")]
    ctxs = [[rng.randrange(1000) for _ in range(4)] for _ in cfgs]
    m = green_mask(cfgs, ctxs, 1000)
    assert m.shape == (4, 1000) and m.dtype == torch.bool
    ref = torch.tensor([[is_green(c, x, t) for t in range(1000)] for c, x in zip(cfgs, ctxs)])
    assert torch.equal(m, ref)
    assert torch.equal(m, green_mask(cfgs, ctxs, 1000))
    # the hash is pure integer arithmetic: fixed values (a change here would silently break old detections)
    assert [mix32(x) for x in (0, 1, 2**32 - 1)] == [0, 1198589870, 121542800]
    assert context_seed(WatermarkConfig("k"), [1, 2, 3]) == context_seed(WatermarkConfig("k"), [3])
    assert WatermarkConfig(42).key_hash == WatermarkConfig("42").key_hash != WatermarkConfig(43).key_hash
    # the context matters; the key matters
    assert not torch.equal(green_mask([cfgs[0]], [[1]], 1000), green_mask([cfgs[0]], [[2]], 1000))
    assert not torch.equal(green_mask([cfgs[0]], [[1]], 1000), green_mask([WatermarkConfig("j")], [[1]], 1000))
    # lefthash is ordered, minhash is not
    lh, mh = WatermarkConfig("k", context_width=2), WatermarkConfig("k", context_width=2, hashing="minhash")
    assert context_seed(lh, [1, 2]) != context_seed(lh, [2, 1]) and context_seed(mh, [1, 2]) == context_seed(mh, [2, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_green_mask_identical_on_cpu_and_gpu():
    cfgs = [WatermarkConfig("k"), WatermarkConfig("k", gamma=0.4, context_width=2, hashing="selfhash")]
    ctxs = [[5, 129279], [77, 3]]
    assert torch.equal(green_mask(cfgs, ctxs, 129280, "cuda").cpu(), green_mask(cfgs, ctxs, 129280, "cpu"))


@pytest.mark.parametrize("gamma", [0.1, 0.25, 0.5])
@pytest.mark.parametrize("hashing", ["lefthash", "selfhash"])
def test_green_fraction_is_gamma_on_average(gamma, hashing):
    V, n = 4096, 256
    cfg = WatermarkConfig("fraction", gamma=gamma, hashing=hashing)
    m = green_mask([cfg] * n, [[t] for t in range(n)], V).double()
    sigma = math.sqrt(gamma * (1 - gamma) / (V * n))
    assert abs(m.mean().item() - gamma) < 4 * sigma
    # per-row fractions vary like a binomial, not more (lists are not degenerate)
    assert m.mean(1).std().item() < 2 * math.sqrt(gamma * (1 - gamma) / V)


def _sequence(cfg: WatermarkConfig, colours: list[bool], seed: int = 0) -> list[int]:
    """Token ids whose scored tokens have exactly the given green/red colours, all (context, token) unique."""
    rng = random.Random(seed)
    ids = [rng.randrange(50000) for _ in range(cfg.context_width)]
    for green in colours:
        while True:
            t = rng.randrange(50000)
            if t not in ids and is_green(cfg, ids, t) == green:
                ids.append(t)
                break
    return ids


@pytest.mark.parametrize("cfg", [WatermarkConfig("k"), WatermarkConfig("k", gamma=0.5, context_width=2),
                                 WatermarkConfig("k", gamma=0.1, context_width=3, hashing="selfhash")])
@pytest.mark.parametrize("T, G", [(200, 50), (200, 120), (64, 0), (30, 30)])
def test_z_score_on_sequences_with_known_green_count(cfg, T, G):
    colours = [True] * G + [False] * (T - G)
    random.Random(1).shuffle(colours)
    ids = _sequence(cfg, colours)
    d = detect(ids, key="k", gamma=cfg.gamma, context_width=cfg.context_width, hashing=cfg.hashing)
    g = cfg.gamma
    z = (G - g * T) / math.sqrt(T * g * (1 - g))
    assert (d.num_tokens_scored, d.num_green) == (T, G)
    assert d.z_score == pytest.approx(z, rel=1e-12, abs=1e-12)
    assert d.p_value == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    assert d.verdict == ("watermarked" if z > 4 else "not watermarked")
    assert detect(ids, config=cfg) == d
    # a different key sees chance
    other = detect(ids, key="other", gamma=g, context_width=cfg.context_width, hashing=cfg.hashing)
    assert abs(other.z_score) < 4.5


def test_repeated_ngrams_are_scored_once():
    cfg = WatermarkConfig("k")
    a, b = next((a, b) for a in range(100) for b in range(100)
                if a != b and is_green(cfg, [a], b) and is_green(cfg, [b], a))
    d = detect([a, b] * 50, key="k")
    # counted naively this would be 99 green of 99 (z = 17); unique pairs are (a, b) and (b, a)
    assert (d.num_tokens_scored, d.num_green, d.verdict) == (2, 2, "too short")
    ids = _sequence(cfg, [True] * 10 + [False] * 30)
    assert detect(ids + ids[1:] + ids[1:], key="k").num_green == 10
    assert detect(ids + ids[1:] + ids[1:], key="k").num_tokens_scored == 40 + 1  # + the pair (ids[-1], ids[1])


def test_detector_on_empty_and_one_token_text(tok):
    for text in ("", " ", "a"):
        d = detect(text, tok, key="k")
        assert d.verdict == "too short" and d.num_tokens_scored == len(tok.encode(text, add_special_tokens=False)[1:])
    assert detect("", tok, key="k") == detect([], key="k") == detect([5], key="k")
    d = detect([], key="k")
    assert (d.z_score, d.p_value, d.num_tokens_scored, d.num_green) == (None, None, 0, 0)
    d = detect([5, 6], key="k")
    assert d.num_tokens_scored == 1 and d.verdict == "too short" and d.z_score is not None
    with pytest.raises(ValueError, match="tokenizer"):
        detect("some text", key="k")


def test_watermark_config_validation_and_secrecy():
    for bad in (dict(key=""), dict(key=None), dict(key="k", gamma=1.0), dict(key="k", gamma=0),
                dict(key="k", delta=-1), dict(key="k", delta=float("inf")), dict(key="k", context_width=0),
                dict(key="k", hashing="sha1")):
        with pytest.raises(ValueError):
            WatermarkConfig(**bad)
    p = SamplingParams(watermark={"key": "top-secret-key", "delta": 3})
    assert isinstance(p.watermark, WatermarkConfig) and p.watermark.delta == 3
    assert "top-secret-key" not in repr(p)
    with pytest.raises(ValueError, match="watermark must be"):
        SamplingParams(watermark="k")


def test_sample_batch_biases_green_tokens_per_row():
    V = 300
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g)
    cfg = WatermarkConfig("row", gamma=0.25, delta=4.0)
    plain = SamplingParams(temperature=0, logprobs=2)
    marked = SamplingParams(temperature=0, logprobs=2, watermark=cfg)
    reqs = [SampleRequest(plain, None, [1, 2], [3]), SampleRequest(marked, None, [1, 2], [3]),
            SampleRequest(marked, None, [9], []), SampleRequest(plain, None, [9], [])]
    out = sample_batch(logits.clone(), reqs)
    ref = [logits[i] + 4.0 * torch.tensor([float(is_green(cfg, ctx, t)) for t in range(V)])
           for i, ctx in ((1, [3]), (2, [9]))]  # the previous token: the last output, else the last prompt token
    assert out.token_ids[0] == logits[0].argmax().item() and out.token_ids[3] == logits[3].argmax().item()
    assert out.token_ids[1] == ref[0].argmax().item() and out.token_ids[2] == ref[1].argmax().item()
    assert out.token_ids[1] != logits[1].argmax().item() or out.token_ids[2] != logits[2].argmax().item()
    # logprobs stay the model's own (no bias)
    lp = logits.log_softmax(-1)
    for i in range(4):
        assert out.logprobs[i][0] == pytest.approx(lp[i, out.token_ids[i]].item())
        assert [t for t, _ in out.logprobs[i][1]] == lp[i].topk(2).indices.tolist()
    # sampled rows: with a huge delta every token drawn is green
    hot = SamplingParams(temperature=1.0, watermark=WatermarkConfig("row", delta=50.0))
    gen = random.Random(1)
    for step in range(20):
        tok = sample_batch(logits[:1].clone(), [SampleRequest(hot, gen, [step], [])]).token_ids[0]
        assert is_green(hot.watermark, [step], tok)


# -- engine ------------------------------------------------------------------------------------------------------

def test_engine_watermark_detected_and_unwatermarked_not(llm, tok):
    cfg = WatermarkConfig("engine-key", gamma=0.25, delta=4.0)
    prompts = ["Alice has", "What is 3 times 5?"]
    base = dict(temperature=1.0, max_tokens=200, ignore_eos=True)
    wm = llm.generate(prompts, [SamplingParams(**base, seed=i, watermark=cfg) for i in range(2)])
    no = llm.generate(prompts, [SamplingParams(**base, seed=i) for i in range(2)])
    for w, n in zip(wm, no):
        assert len(w.token_ids) == 200
        dw = detect(w.token_ids, key="engine-key")
        assert dw.z_score > 4 and dw.verdict == "watermarked" and dw.p_value < 1e-5
        # from the text alone (re-tokenized: random-model bytes do not always re-encode to the same ids)
        dt = detect(w.text, tok, key="engine-key")
        assert dt.z_score > 4 and dt.verdict == "watermarked"
        dn = detect(n.token_ids, key="engine-key")
        assert abs(dn.z_score) < 3 and dn.verdict == "not watermarked"
        assert abs(detect(n.text, tok, key="engine-key").z_score) < 3
        assert abs(detect(w.token_ids, key="another-key").z_score) < 3


def test_engine_watermark_applies_per_row_in_a_mixed_batch(llm):
    greedy = dict(temperature=0, max_tokens=40, ignore_eos=True)
    cfg = WatermarkConfig("mixed", delta=4.0)
    prompts = ["The cat sat on", "12+35=", "Once upon a time"]
    alone = llm.generate(prompts, SamplingParams(**greedy))
    mixed = llm.generate(prompts, [SamplingParams(**greedy), SamplingParams(**greedy, watermark=cfg),
                                   SamplingParams(**greedy)])
    marked_alone = llm.generate(prompts[1], SamplingParams(**greedy, watermark=cfg))[0]
    assert mixed[0].token_ids == alone[0].token_ids and mixed[2].token_ids == alone[2].token_ids
    assert mixed[1].token_ids == marked_alone.token_ids != alone[1].token_ids
    assert detect(mixed[1].token_ids, key="mixed").z_score > 4
    assert detect(alone[1].token_ids, key="mixed").z_score < 4


def test_cli_watermark_detect(tiny, tok, tmp_path, llm):
    out = llm.generate("Bob has", SamplingParams(max_tokens=200, ignore_eos=True, seed=3,
                                                 watermark=WatermarkConfig("cli-key", delta=4.0)))[0]
    f = tmp_path / "text.txt"
    f.write_text(out.text, encoding="utf-8")
    cmd = [sys.executable, "-m", "mixr", "watermark", "detect", "--key", "cli-key", "--tokenizer", str(tiny)]
    r = subprocess.run(cmd + [str(f)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = detect(out.text, tok, key="cli-key")
    assert got == {"z_score": want.z_score, "num_tokens_scored": want.num_tokens_scored,
                   "num_green": want.num_green, "p_value": want.p_value, "verdict": "watermarked"}
    r = subprocess.run(cmd + ["--gamma", "0.5", ""], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "too short"
    r = subprocess.run(cmd + ["--gamma", "1.5", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "gamma" in r.stderr


# -- classifier from a model directory ---------------------------------------------------------------------------

LABELS = {0: "safe", 1: "toxic", 2: "violent"}


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def classifier_dir(request, tmp_path_factory):
    """A tiny random Hugging Face *ForSequenceClassification checkpoint (decoder + score.weight), as
    transformers writes it, with a tokenizer; and the transformers model itself as the reference."""
    from conftest import VOCAB, randomize_
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from mixr.tiny_tokenizer import build_tokenizer
    path = tmp_path_factory.mktemp(f"classifier-{request.param}")
    config = AutoConfig.for_model(request.param, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                  max_position_embeddings=256, id2label=LABELS,
                                  label2id={v: k for k, v in LABELS.items()}, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    randomize_(model, 0)
    model.save_pretrained(path)
    build_tokenizer(path, vocab_size=VOCAB)
    return path, model.eval()


def test_classifier_probabilities_match_transformers(classifier_dir):
    from mixr.safety.classifier import SequenceClassifier
    path, hf = classifier_dir
    clf = SequenceClassifier(path, block_labels=["toxic", "violent"], device="cpu", batch_size=3)
    assert clf.labels == ["safe", "toxic", "violent"]
    g = torch.Generator().manual_seed(1)
    batch = [torch.randint(1, 500, (n,), generator=g).tolist() for n in (1, 5, 17, 40, 9)]
    batch.append([7, 8, 0, 9, 0, 0])  # pad ids inside and at the end: the last non-pad token is pooled
    got = clf.probabilities_of_ids(batch)  # right-padded batches of 3 (causal: the padding changes nothing)
    with torch.no_grad():
        want = torch.cat([hf(torch.tensor([ids])).logits.softmax(-1) for ids in batch])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert got.sum(-1).sub(1).abs().max() < 1e-5
    # texts go through the checkpoint's tokenizer, as transformers' pipeline would
    texts = ["Alice has 3 apples.", "What is 12 times 3?"]
    probs = clf.probabilities(texts)
    for text, p in zip(texts, probs):
        with torch.no_grad():
            ref = hf(torch.tensor([clf.tokenizer.encode(text)])).logits.softmax(-1)[0]
        assert list(p) == clf.labels and p["toxic"] == pytest.approx(ref[1].item(), rel=1e-4)
    # the hook: the likeliest blocking label
    label, score = clf(texts[0])
    assert (label, score) == max(((k, v) for k, v in probs[0].items() if k != "safe"), key=lambda kv: kv[1])


def test_classifier_hook_blocks_from_a_config_file(classifier_dir, tmp_path):
    from mixr.safety.classifier import SequenceClassifier
    path, _ = classifier_dir
    clf = SequenceClassifier(path, block_labels=["toxic"], device="cpu")
    texts = ["Alice has 3 apples.", "Bob sees 4 cats.", "What is 12 times 3?", "Once upon a time"]
    toxic = sorted((p["toxic"], t) for p, t in zip(clf.probabilities(texts), texts))
    (low, allowed), (high, blocked) = toxic[0], toxic[-1]
    assert high > low
    threshold = (low + high) / 2
    (tmp_path / "safety.toml").write_text(f"""
[filter]
classifier_threshold = {threshold!r}
classifier = {{model_dir = '{path}', block_labels = ["toxic"], device = "cpu"}}
""")
    cfg = SafetyConfig.from_file(tmp_path / "safety.toml")
    d = check_input(blocked, cfg.filter)
    assert (d.allowed, d.category, d.rule) == (False, "toxic", "classifier")
    assert d.score == pytest.approx(high)
    assert check_input(allowed, cfg.filter).allowed
    # chat messages are classified as their joined text
    assert not check_input([{"role": "user", "content": blocked}], cfg.filter).allowed

    # a text longer than max_length is scored in windows; the likeliest window decides
    short = SequenceClassifier(path, block_labels=["toxic"], device="cpu", max_length=8)
    long_text = " ".join(texts * 3)
    ids = short.tokenizer.encode(long_text)
    assert len(ids) > 16
    windows = short.probabilities_of_ids([ids[k:k + 8] for k in range(0, len(ids), 8)])
    assert short(long_text) == ("toxic", pytest.approx(windows[:, 1].max().item()))

    with pytest.raises(ValueError, match=r"unknown block_labels \['hateful'\].*'safe', 'toxic', 'violent'"):
        SequenceClassifier(path, block_labels=["hateful"], device="cpu")
    with pytest.raises(ValueError, match="block_labels is empty"):
        SequenceClassifier(path, block_labels=[], device="cpu")
    (tmp_path / "bad.toml").write_text(f"[filter]\nclassifier = {{model_dir = '{path}', labels = ['toxic']}}\n")
    with pytest.raises(ValueError, match="bad.toml.*labels"):
        SafetyConfig.from_file(tmp_path / "bad.toml")


def test_classifier_refuses_a_language_model_directory(tiny):
    from mixr.checkpoint import CheckpointError
    from mixr.safety.classifier import SequenceClassifier
    with pytest.raises(CheckpointError, match="no id2label"):
        SequenceClassifier(tiny, block_labels=["toxic"], device="cpu")
