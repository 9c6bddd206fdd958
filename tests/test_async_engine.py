"""AsyncLLM: concurrent streams equal their offline output; an abandoned stream frees its blocks."""

import asyncio

import pytest

from mixr import SamplingParams
from mixr.engine.async_engine import AsyncLLM
from mixr.engine.llm_engine import EngineConfig, LLMEngine


@pytest.fixture(scope="module")
def engine(checkpoint):
    return LLMEngine(checkpoint("deepseek_v3_noaux_tc"), device="cpu", dtype="float32",
                     config=EngineConfig(block_size=8))


def test_concurrent_streams_match_offline(engine):
    aengine = AsyncLLM(engine)
    prompts = [[5, 6, 7], list(range(20, 50)), [9] * 12, [100, 3, 44, 7]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def one(p):
        text, tokens, last = "", [], None
        async for out in aengine.generate(p, params):
            text += out.outputs[0].delta_text
            tokens += out.outputs[0].delta_token_ids
            last = out
        return text, tokens, last

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(main())
    from mixr.reference import reference_generate
    expected = reference_generate(engine.model, prompts, 12)
    for (text, tokens, last), exp in zip(results, expected):
        assert tokens == exp == last.token_ids
        assert last.finished and text == last.text == engine.tokenizer.decode(exp)


def test_closing_a_stream_aborts_it(engine):
    aengine = AsyncLLM(engine)

    async def main():
        gen = aengine.generate([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(main())
    bm = engine.scheduler.block_manager
    assert not engine.has_unfinished_requests()
    assert bm.num_free_blocks == engine.runner.num_blocks


def test_bad_request_raises_at_once(engine):
    aengine = AsyncLLM(engine)

    async def main():
        async for _ in aengine.generate([1] * 300, SamplingParams(max_tokens=4)):
            pass

    with pytest.raises(ValueError, match="the model's context is 256 tokens"):
        asyncio.run(main())


def test_a_slow_reader_still_sees_every_delta(engine):
    aengine = AsyncLLM(engine)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)

    async def main():
        text, tokens, last = "", [], None
        async for out in aengine.generate([7, 8, 9, 10], params):
            await asyncio.sleep(0.02)  # the engine runs ahead meanwhile
            text += out.outputs[0].delta_text
            tokens += out.outputs[0].delta_token_ids
            last = out
        return text, tokens, last

    text, tokens, last = asyncio.run(main())
    assert tokens == last.token_ids and len(tokens) == 24
    assert text == last.text
