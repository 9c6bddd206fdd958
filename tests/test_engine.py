"""The engine (paged, continuously batched, prefix-cached, chunked, preempted) against the reference path."""

import random

import pytest
import torch

from conftest import FAMILIES, VOCAB, forced_gaps
from mixr import LLM, SamplingParams
from mixr.reference import reference_generate
from mixr.sampling import SampleRequest, apply_penalties, sample_batch

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
ASYNC = False


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "async"])
def scheduling(request):
    """Every engine test runs with and without async scheduling (the next decode step queued before the tokens
    of this one are read: the GPU default)."""
    global ASYNC
    ASYNC = request.param


def prompts(seed: int, lengths=(5, 23, 11, 40)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def engine(path, **kw) -> LLM:
    kw.setdefault("block_size", 8)
    kw.setdefault("async_scheduling", ASYNC)
    return LLM(path, device="cpu", dtype="float32", **kw)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_engine_matches_reference_on_every_family(name, checkpoint):
    llm = engine(checkpoint(name))
    ps = prompts(0)
    expected = reference_generate(llm.model, ps, 16)
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == expected


def test_prefix_cache_skips_the_shared_prompt(checkpoint):
    llm = engine(checkpoint("deepseek_v3_noaux_tc"))
    system = prompts(1, (60,))[0]
    a, b = system + [7, 8, 9], system + [10, 11]
    first = llm.generate(a, GREEDY)[0]
    second = llm.generate(b, GREEDY)[0]
    assert first.metrics.num_cached_tokens == 0
    assert second.metrics.num_cached_tokens == 56  # the 7 full blocks of 8 tokens inside the 60-token prefix
    assert [first.token_ids, second.token_ids] == reference_generate(llm.model, [a, b], 16)
    again = llm.generate(a, GREEDY)[0]  # the whole prompt is cached except what must be recomputed
    assert again.metrics.num_cached_tokens == 56 and again.token_ids == first.token_ids


def test_preemption_under_a_tiny_cache_loses_nothing(checkpoint):
    path = checkpoint("qwen3_moe")
    per_token = 3 * 2 * 1 * 2 * 24 * 4  # layers x (K, V) x kv heads... (2 heads of 24) x fp32
    llm = engine(path, block_size=4, kv_cache_bytes=per_token * 4 * 24)  # 24 blocks of 4 tokens for 8 requests
    ps = prompts(2, (9, 14, 6, 20, 11, 3, 17, 8))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = llm.generate(ps, params)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in out] == reference_generate(llm.model, ps, 24)
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.runner.num_blocks


def test_chunked_prefill_matches(checkpoint):
    llm = engine(checkpoint("deepseek_v2_group_limited_yarn"), max_num_batched_tokens=16, max_num_seqs=4)
    ps = prompts(3, (70, 5, 33))
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == reference_generate(llm.model, ps, 16)


def test_continuous_batching_admits_while_decoding(checkpoint):
    """Requests arriving mid-flight join the running batch and still match the reference."""
    llm = engine(checkpoint("mixtral"))
    eng = llm.engine
    ps = prompts(4, (12, 30, 7))
    eng.add_request("a", ps[0], GREEDY)
    done = {}
    for step in range(200):
        if step == 3:
            eng.add_request("b", ps[1], GREEDY)
        if step == 6:
            eng.add_request("c", ps[2], GREEDY)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        if len(done) == 3:
            break
    assert [done[k] for k in "abc"] == reference_generate(llm.model, ps, 16)


def test_abort_frees_blocks_at_once(checkpoint):
    llm = engine(checkpoint("deepseek_v3_noaux_tc"))
    eng = llm.engine
    eng.add_request("x", prompts(5, (50,))[0], SamplingParams(max_tokens=100, ignore_eos=True))
    eng.step()
    eng.step()
    bm = eng.scheduler.block_manager
    assert bm.num_free_blocks < eng.runner.num_blocks
    eng.abort_request("x")
    assert bm.num_free_blocks == eng.runner.num_blocks
    assert not eng.has_unfinished_requests()
    assert eng.step() == []


def test_stream_early_exit_aborts(checkpoint):
    llm = engine(checkpoint("deepseek_v3_noaux_tc"))
    it = llm.stream("The cat", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(it)
    it.close()
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.runner.num_blocks


def test_n_samples_share_the_prompt_and_differ(checkpoint):
    llm = engine(checkpoint("deepseek_v3_noaux_tc"))
    p = prompts(6, (40,))[0]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    out = llm.generate(p, params)[0]
    assert len(out.outputs) == 4 and all(len(o.token_ids) == 12 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert out.metrics.num_cached_tokens == 32  # later samples read the first one's 4 full prompt blocks
    again = llm.generate(p, params)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]


def test_seed_is_independent_of_batch_composition(checkpoint):
    llm = engine(checkpoint("qwen2_moe"))
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, max_tokens=14, seed=3, ignore_eos=True)
    alone = llm.generate([9, 8, 7], seeded)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=5), seeded, SamplingParams(temperature=0, max_tokens=30)]
    mixed = llm.generate([[1, 2, 3, 4], [9, 8, 7], [5] * 30], others)[1].token_ids
    assert mixed == alone


def test_logprobs_are_the_model_log_softmax(checkpoint):
    llm = engine(checkpoint("olmoe"))
    p = prompts(7, (10,))[0]
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    with torch.no_grad():
        full = llm.model(torch.tensor([p + out.token_ids]))[0, len(p) - 1:-1].log_softmax(-1)
    for t, (tok, (chosen, top)) in enumerate(zip(out.token_ids, lps)):
        assert chosen == pytest.approx(full[t, tok].item(), abs=1e-4)
        assert top[0][0] == tok  # greedy picked the top token
        assert [i for i, _ in top] == full[t].topk(3).indices.tolist()


def test_penalties_on_hand_built_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    p = SamplingParams(repetition_penalty=2.0)
    assert apply_penalties(logits.clone(), [0], [1], p).tolist() == [1.0, -2.0, 0.5, 3.0]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    assert apply_penalties(logits.clone(), [3], [2, 2, 0], p).tolist() == [1.25, -1.0, -0.5, 3.0]
    # a large presence penalty moves greedy away from the repeated top token
    req = SampleRequest(SamplingParams(temperature=0, presence_penalty=2.0), None, [], [3])
    assert sample_batch(logits[None], [req]).token_ids == [0]


def test_min_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = random.Random(0)
    params = SamplingParams(temperature=1.0, min_p=0.4, seed=0)  # keeps p >= 0.2
    got = {sample_batch(logits[None], [SampleRequest(params, g, [], [])]).token_ids[0] for _ in range(200)}
    assert got == {0, 1}


def test_too_long_prompt_is_rejected_and_others_run(checkpoint):
    llm = engine(checkpoint("llama_rope_llama3"))
    with pytest.raises(ValueError, match="prompt 1: prompt has 300 tokens; the model's context is 256"):
        llm.generate([[1, 2, 3], [4] * 300], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert len(llm.generate([1, 2, 3], GREEDY)[0].token_ids) == 16


def test_metrics(checkpoint):
    llm = engine(checkpoint("deepseek_v3_noaux_tc"))
    m = llm.generate([1, 2, 3, 4, 5], GREEDY)[0].metrics
    assert m.num_prompt_tokens == 5 and m.num_generated_tokens == 16
    assert 0 < m.time_to_first_token and 0 < m.inter_token_latency


def test_async_scheduling_gives_the_same_outputs(checkpoint):
    """Stop tokens, stop strings, EOS, n > 1, seeds, logprobs, penalties, different lengths and a request joining
    mid-flight (penalized: it needs its tokens at once): queued ahead or not, every output is the same, and steps were queued ahead."""
    path = checkpoint("deepseek_v3_noaux_tc")
    ps = prompts(8, (9, 17, 4, 25, 12))
    probe = engine(path, async_scheduling=False).generate(ps[0], SamplingParams(temperature=0, max_tokens=12))[0]
    params = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[probe.token_ids[5]]),
              SamplingParams(temperature=0, max_tokens=20, stop=[probe.text[-6:-2]]),  # ends ps[0] early
              SamplingParams(n=2, temperature=0.8, top_p=0.9, seed=5, max_tokens=9, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=1, max_tokens=15, ignore_eos=True),
              SamplingParams(temperature=0.5, seed=2, max_tokens=4, presence_penalty=0.5)]  # not queued ahead
    runs = {}
    for mode in (False, True):
        llm = engine(path, async_scheduling=mode)
        eng, done, lps, ahead = llm.engine, {}, {}, 0
        for i in range(4):
            eng.add_request(str(i), ps[i] if i != 1 else ps[0], params[i])
        for step in range(100):
            if step == 4:
                eng.add_request("late", ps[4], params[4])
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = [(o.token_ids, o.text, o.finish_reason) for o in out.outputs]
                    lps[out.request_id] = [[(c, *(x for alt in top for x in alt)) for c, top in o.logprobs or []]
                                           for o in out.outputs]
            ahead += eng._ahead is not None
            if not eng.has_unfinished_requests():
                break
        assert eng.scheduler.block_manager.num_free_blocks == eng.runner.num_blocks
        runs[mode] = (done, ahead, lps)
    assert runs[True][0] == runs[False][0]
    for k, v in runs[False][2].items():  # the same up to float rounding (other batch shapes)
        assert runs[True][2][k] == [[pytest.approx(row, abs=1e-4) for row in o] for o in v]
    assert runs[False][1] == 0 and runs[True][1] >= 5
    assert [runs[True][0][k][0][2] for k in "01"] == ["stop", "stop"]
    assert len(runs[True][0]["0"][0][0]) == 6 and len(runs[True][0]["1"][0][0]) < 12


@pytest.mark.parametrize("name", list(FAMILIES))
def test_short_prompt_chunks_run_as_decode_rows(name, checkpoint, monkeypatch):
    """Short prompt chunks run as decode rows, each attending to the rows before it (on a
    GPU inside the captured graphs; forced here on the eager path): the reference's tokens, for new prompts,
    chunked prompts and the tail after a cached prefix."""
    llm = engine(checkpoint(name), max_num_batched_tokens=24, max_num_seqs=4)
    runner, used = llm.engine.runner, []
    monkeypatch.setattr(runner, "fits_decode", lambda seqs, counts: max(counts) <= 16 and sum(counts) <= 32)
    decode = runner.decode
    monkeypatch.setattr(runner, "decode", lambda seqs, next_ids=None, counts=None: (
        used.append(counts), decode(seqs, next_ids, counts))[1])
    ps = prompts(9, (5, 12, 3, 30))
    assert [o.token_ids for o in llm.generate(ps, GREEDY)] == reference_generate(llm.model, ps, 16)
    tail = ps[3] + [7, 8, 9]
    again = llm.generate(tail, GREEDY)[0]
    assert again.metrics.num_cached_tokens == 24 and again.token_ids == reference_generate(llm.model, [tail], 16)[0]
    assert [9] in used and any(c and max(c) > 1 and len(c) > 1 for c in used)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["deepseek_v3_noaux_tc", "deepseek_v2_group_limited_yarn", "qwen3_moe", "mixtral",
                                  "llama_rope_llama3"])
def test_engine_on_cuda_queues_ahead_and_runs_short_prompts_in_graphs(name, checkpoint):
    """On a GPU, by default: decode steps are queued ahead, and short prompts run as decode rows in the captured
    graphs. The tokens are the reference forward's argmax on the same tokens, to bf16 rounding (see forced_gaps)."""
    if ASYNC:
        pytest.skip("builds its own engine: one run is enough")
    llm = LLM(checkpoint(name), device="cuda", dtype="bfloat16", max_num_seqs=32, max_model_len=256)
    eng = llm.engine
    assert eng.runner.graphs and eng._async
    used, ahead = [], []
    decode, schedule_ahead = eng.runner.decode, eng.scheduler.schedule_ahead
    eng.runner.decode = lambda seqs, next_ids=None, counts=None: (
        used.append(counts), decode(seqs, next_ids, counts))[1]
    eng.scheduler.schedule_ahead = lambda batch: (lambda b: (ahead.append(b is not None), b)[1])(
        schedule_ahead(batch))
    short, long = prompts(10, (5, 12, 9)), prompts(11, (40, 3))
    got = [o.token_ids for o in llm.generate(short, GREEDY)] + [o.token_ids for o in llm.generate(long, GREEDY)]
    assert [5, 12, 9] in used and sum(ahead) >= 20
    gaps = forced_gaps(llm.model, short + long, got)
    assert (gaps <= 0.05).sum() >= len(gaps) - 2 and gaps.max() <= 0.5, gaps
