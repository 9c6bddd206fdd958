"""LLM.generate / chat / stream, sampling options, and the CLI, on a tiny DeepSeek-V3 checkpoint."""

import random
import subprocess
import sys

import pytest
import torch

from mixr import LLM, SamplingParams
from mixr.sampling import SampleRequest, filter_logits, filtered_probs, sample_batch
from mixr.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(checkpoint("deepseek_v3_noaux_tc"), device="cpu", dtype="float32")


def test_batched_equals_single(llm):
    prompts = ["The cat sat on", "12+35=", "Once upon a time, in a land far away, there"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for p, b in zip(prompts, batched):
        single = llm.generate(p, params)[0]
        assert single.token_ids == b.token_ids
        assert single.text == b.text == llm.tokenizer.decode(b.token_ids)
        assert b.prompt_token_ids == llm.tokenizer.encode(p)


def test_seeded_sampling_is_reproducible_and_independent_of_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=123, ignore_eos=True)
    alone = llm.generate("hello", p)[0].token_ids
    in_batch = llm.generate(["x y z", "hello", "1+1="], [SamplingParams(temperature=1.0, max_tokens=5, seed=9), p,
                                                         SamplingParams(temperature=0.7, max_tokens=20)])[1]
    assert in_batch.token_ids == alone
    other = llm.generate("hello", SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=124,
                                                 ignore_eos=True))[0].token_ids
    assert other != alone


def test_top_k_and_top_p_filters():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 2.0])
    rng = random.Random(0)

    def draws(params, n):
        return {sample_batch(logits[None], [SampleRequest(params, rng, [], [])]).token_ids[0] for _ in range(n)}

    assert draws(SamplingParams(temperature=1.0, top_k=1), 20) == {1}
    assert draws(SamplingParams(temperature=1.0, top_k=2), 200) == {1, 2}
    # probs ~ [.02, .44, .40, .01, .16]: top_p=0.8 keeps the two best (0.44 < 0.8 <= 0.84)
    assert draws(SamplingParams(temperature=1.0, top_p=0.8), 300) == {1, 2}
    assert draws(SamplingParams(temperature=0), 1) == {1}


def test_batched_filters_equal_the_row_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[2, :4] = logits[2, 10]  # ties with the k-th value are kept, as in the reference
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=5),
              SamplingParams(temperature=1.0, top_k=11), SamplingParams(temperature=1.3, top_p=0.7),
              SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05), SamplingParams(temperature=1, min_p=0.2)]
    got = filtered_probs(logits, params)
    want = torch.stack([filter_logits(logits[i], p).softmax(-1) for i, p in enumerate(params)])
    torch.testing.assert_close(got, want)
    assert ((got > 0).sum(-1) < 50).tolist() == [False, True, True, True, True, True]


def test_sampled_frequencies_follow_the_distribution():
    # 4000 draws from one row per step, mixed with greedy and other rows: each token's frequency is within
    # 4.5 standard errors of its probability, and a token of zero probability (after top_k) never comes up
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5, -3.0], [0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    p = SamplingParams(temperature=0.9, top_k=4)
    probs = filter_logits(logits[0], p).softmax(-1)
    rng, other = random.Random(3), random.Random(4)
    counts = torch.zeros(6)
    for _ in range(4000):
        out = sample_batch(logits[[1, 0, 1]], [SampleRequest(SamplingParams(temperature=0), None, [], []),
                                              SampleRequest(p, rng, [], []),
                                              SampleRequest(SamplingParams(temperature=2.0), other, [], [])])
        assert out.token_ids[0] == 1
        counts[out.token_ids[1]] += 1
    freq = counts / 4000
    se = (probs * (1 - probs) / 4000).sqrt()
    assert ((freq - probs).abs() <= 4.5 * se + 1e-9).all(), (freq, probs)
    assert counts[probs == 0].sum() == 0 and (probs == 0).sum() == 2


def test_stop_string_spanning_tokens(llm):
    base = llm.generate("The", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    text = base.text
    assert len(text) > 8
    # a stop string that straddles a token boundary somewhere in the middle of the text
    bounds, acc = [], ""
    for t in base.token_ids:
        acc = llm.tokenizer.decode(base.token_ids[: len(bounds) + 1])
        bounds.append(len(acc))
    cut = next(b for b in bounds if 3 <= b <= len(text) - 3)
    stop = text[cut - 2: cut + 2]
    first = text.find(stop)
    out = llm.generate("The", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:first]
    streamed = "".join(llm.stream("The", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])))
    assert streamed == out.text


def test_stop_token_ids_and_eos(llm):
    base = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    stop_at = base.token_ids[4]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    assert llm.tokenizer.stop_token_ids  # from tokenizer_config / generation_config


def test_stream_concatenates_to_text(llm):
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    assert "".join(llm.stream("Once", params)) == llm.generate("Once", params)[0].text


def test_chat_applies_template(llm):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert len(out.token_ids) == 8


def test_bad_requests(llm):
    with pytest.raises(ValueError, match="the model's context is 256 tokens"):
        llm.generate([5] * 256, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 99999]])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)


def test_cli_generate_prints_the_greedy_text(checkpoint, llm):
    path = checkpoint("deepseek_v3_noaux_tc")
    r = subprocess.run([sys.executable, "-m", "mixr", "generate", str(path), "The cat", "--max-tokens", "10",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    expected = llm.generate("The cat", SamplingParams(temperature=0, max_tokens=10))[0].text
    assert r.stdout == expected + "\n"


def test_cli_chat_reads_stdin_until_eof(checkpoint):
    path = checkpoint("deepseek_v3_noaux_tc")
    r = subprocess.run([sys.executable, "-m", "mixr", "chat", str(path), "--max-tokens", "5", "--temperature", "0",
                        "--device", "cpu"], input="hello\nsecond turn\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) >= 1


def test_tiny_default_checkpoint_round_trip(tmp_path):
    from mixr.tiny import make_tiny_checkpoint
    path = make_tiny_checkpoint(tmp_path / "tiny")
    llm = LLM(path, device="cpu")
    assert llm.config.model_type == "deepseek_v3"
    assert Tokenizer.from_dir(path).vocab_size == llm.config.vocab_size
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4))[0]
    assert 1 <= len(out.token_ids) <= 4
