"""The torch-free scheduling half of the engine: blocks, prefix cache, scheduler.

FakeRunner stands in for the model: its KV cache stores (position, token) per slot, and its next token is a
function of the context it reads back through the block table. So a wrong slot mapping, a shared block that
gets written, or a bad prefix hit changes the outputs, which are compared against each request run alone.
"""

import ast
import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mixr.engine.block_manager import BlockManager, DataParallelBlocks, hash_block
from mixr.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from mixr.engine.sequence import Sequence, SequenceStatus
from mixr.sampling import SamplingParams

ENGINE = Path(__file__).resolve().parent.parent / "mixr" / "engine"


def make(seq_id: int, prompt, **params) -> Sequence:
    return Sequence(seq_id, list(prompt), SamplingParams(**params))


def scheduler(eos=frozenset(), **kw) -> Scheduler:
    cfg = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=128)
    return Scheduler(SchedulerConfig(**(cfg | kw)), eos_token_ids=eos)


def compute(bm: BlockManager, seq: Sequence, upto: int | None = None) -> None:
    """Pretend the runner computed seq's tokens up to `upto`."""
    start = seq.num_computed_tokens
    seq.num_computed_tokens = seq.num_tokens if upto is None else upto
    bm.commit(seq, start)


def fake_token(seq_id: int, context: list[int]) -> int:
    return (seq_id * 7 + len(context) + sum(context)) % 50


def pools(sched: Scheduler) -> list[BlockManager]:
    """The block managers of the scheduler's KV caches: one, or one per data-parallel rank."""
    bm = sched.block_manager
    return bm.pools if isinstance(bm, DataParallelBlocks) else [bm]


def check_blocks(sched: Scheduler) -> None:
    """Reference counts equal the block tables that hold them; free list and hash table agree."""
    for rank, bm in enumerate(pools(sched)):
        refs = [0] * bm.num_blocks
        for seq in sched.running:
            assert len(seq.block_table) == len(set(seq.block_table))
            if seq.dp_rank == rank:
                for b in seq.block_table:
                    refs[b] += 1
        assert refs == bm.ref_count
        assert set(bm.free) == {b for b in range(bm.num_blocks) if refs[b] == 0}
        assert {h: b for b, h in enumerate(bm.block_hash) if h is not None} == bm.hash_to_block
    for seq in sched.waiting:
        assert not seq.block_table and seq.num_computed_tokens == 0
    if isinstance(sched.block_manager, DataParallelBlocks):
        assert sched.block_manager.active == [sum(s.dp_rank == r for s in sched.running)
                                              for r in range(len(pools(sched)))]


class FakeRunner:
    """One KV cache per data-parallel rank (one without): a sequence reads and writes only its rank's."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.kvs = [[None] * (bm.num_blocks * bm.block_size) for bm in pools(sched)]
        self.steps: list[ScheduledBatch] = []

    def step(self) -> list[Sequence]:
        sched, cfg = self.sched, self.sched.config
        batch = sched.schedule()
        self.steps.append(batch)
        assert len(batch) <= cfg.max_num_seqs and len(sched.running) <= cfg.max_num_seqs
        assert batch.num_tokens <= cfg.max_num_batched_tokens
        assert len({s.seq_id for s in batch.seqs}) == len(batch)
        check_blocks(sched)
        sampled = []
        for seq, start, n, do_sample in zip(batch.seqs, batch.start_positions, batch.num_new_tokens, batch.do_sample):
            bm, kv = pools(sched)[seq.dp_rank], self.kvs[seq.dp_rank]
            assert seq.status is SequenceStatus.RUNNING and n >= 1 and start == seq.num_computed_tokens
            assert do_sample == (start + n == seq.num_tokens) and (n > 1 or do_sample)  # 1-token rows are decodes
            for p, slot in zip(range(start, start + n), bm.slots(seq, start, start + n)):
                b = slot // bm.block_size
                assert bm.ref_count[b] == 1 and bm.block_hash[b] is None, "wrote into a shared or cached block"
                kv[slot] = (p, seq.token_ids[p])
            context = [kv[s] for s in bm.slots(seq, 0, start + n)]
            assert context == list(enumerate(seq.token_ids[:start + n]))
            sampled.append(fake_token(seq.seq_id, [t for _, t in context]) if do_sample else None)
        finished = sched.postprocess(batch, sampled)
        check_blocks(sched)
        return finished

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("requests did not finish")


def solo(seq: Sequence, eos=frozenset(), max_model_len: int = 512) -> list[int]:
    """The tokens seq generates when it runs alone in a big cache."""
    sched = scheduler(eos=eos, num_blocks=256, max_model_len=max_model_len)
    alone = Sequence(seq.seq_id, seq.prompt_token_ids, seq.params)
    sched.add(alone)
    FakeRunner(sched).run()
    return alone.generated_token_ids


# -- sequence and config -------------------------------------------------------------------------------------------
def test_sequence_properties():
    s = make(3, range(10, 20), max_tokens=4)
    s.token_ids += [1, 2]
    assert (s.num_tokens, s.num_prompt_tokens, s.num_generated, s.last_token) == (12, 10, 2, 2)
    assert s.generated_token_ids == [1, 2] and s.prompt_token_ids == list(range(10, 20))
    assert s.num_blocks(4) == 3 and s.num_blocks(6) == 2
    assert s.block_tokens(2, 4) == [18, 19, 1, 2] and s.block_tokens(1, 8) == [18, 19, 1, 2]
    assert s.status is SequenceStatus.WAITING and not s.is_finished


def test_config_validation():
    SchedulerConfig(num_blocks=8, max_model_len=64)
    with pytest.raises(ValueError, match="num_blocks"):
        SchedulerConfig(num_blocks=0, max_model_len=64)
    with pytest.raises(ValueError, match="block_size"):
        SchedulerConfig(num_blocks=8, max_model_len=64, block_size=-16)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(num_blocks=8, max_model_len=64, max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ValueError, match="chunked"):
        SchedulerConfig(num_blocks=8, max_model_len=4096, max_num_batched_tokens=2048, enable_chunked_prefill=False)


def test_engine_modules_import_no_torch():
    for name in ("sequence.py", "block_manager.py", "scheduler.py"):
        for node in ast.walk(ast.parse((ENGINE / name).read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m.split(".")[0] == "torch" for m in modules), name
    # A fresh interpreter with a bare `mixr` package (mixr/__init__.py imports torch) imports the scheduler.
    code = ("import sys, types; pkg = types.ModuleType('mixr'); pkg.__path__ = [sys.argv[1]]; "
            "sys.modules['mixr'] = pkg; import mixr.engine.scheduler; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(ENGINE.parent)], check=True)


# -- block manager -------------------------------------------------------------------------------------------------
def test_allocate_free_refcount_and_slots():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make(0, range(10))
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and a.num_cached_tokens == a.num_computed_tokens == 0
    assert bm.num_free_blocks == 7 and bm.usage == pytest.approx(0.3)
    assert all(bm.ref_count[b] == 1 for b in a.block_table)
    t = a.block_table
    assert bm.slots(a, 2, 6) == [t[0] * 4 + 2, t[0] * 4 + 3, t[1] * 4, t[1] * 4 + 1]
    with pytest.raises(ValueError):
        bm.slots(a, 10, 13)
    assert not bm.can_allocate(make(1, range(100, 132)))  # 8 blocks > 7 free
    bm.deallocate(a)
    assert a.block_table == [] and bm.num_free_blocks == 10 and bm.usage == 0
    assert bm.ref_count == [0] * 10


def test_prefix_hit_shares_full_blocks_and_lru_eviction():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make(0, range(10))
    bm.allocate(a)
    compute(bm, a)
    assert len(bm.hash_to_block) == 2  # the two full blocks; the partial one is never shared
    b = make(1, [*range(8), 99, 98, 97])
    bm.allocate(b)
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count[x] for x in a.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 6
    compute(bm, b)
    bm.deallocate(b)
    bm.deallocate(a)
    assert bm.num_free_blocks == 10 and len(bm.hash_to_block) == 2  # freed, still cached
    # a freed prefix is still a hit: its blocks come back off the free list
    c = make(2, range(10))
    bm.allocate(c)
    assert c.num_cached_tokens == 8 and bm.num_free_blocks == 7
    a0, a1 = c.block_table[:2]
    bm.deallocate(c)
    # LRU: never-used blocks go first, then the least recently freed; a sequence's tail is freed before its head
    assert list(bm.free)[-2:] == [a1, a0]
    big = make(3, range(100, 128))  # 7 blocks: takes every free block that holds no cached prefix
    bm.allocate(big)
    assert a0 not in big.block_table and a1 not in big.block_table and len(bm.hash_to_block) == 2
    two = make(4, range(200, 208))  # 2 more blocks: an uncached one, then a1 (the prefix's tail) is evicted first
    bm.allocate(two)
    assert two.block_table[1] == a1 and len(bm.hash_to_block) == 1
    d = make(5, range(10))
    assert bm.cached_prefix(d) == 4


def test_fully_cached_prompt_still_computes_its_last_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make(0, range(8))
    bm.allocate(a)
    compute(bm, a)
    b = make(1, range(8))
    bm.allocate(b)
    # both blocks are cached, but the last token's logits are needed: the last block is recomputed, not shared
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]


def test_partial_block_is_never_shared():
    sched = scheduler()
    runner = FakeRunner(sched)
    a = make(0, range(6), max_tokens=1)
    sched.add(a)
    sched.add(b := make(1, range(6), max_tokens=1))
    runner.run()
    assert b.num_cached_tokens == 4  # one full block; the 2-token tail is computed again
    assert sum(h is not None for h in sched.block_manager.block_hash) == 1


def test_no_prefix_caching():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make(0, range(10))
    bm.allocate(a)
    compute(bm, a)
    b = make(1, range(10))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table) and not bm.hash_to_block


def test_data_parallel_pools_balance_then_share_prefixes():
    """Each sequence's blocks come from one rank's pool: the least loaded, then the one with its prefix cached."""
    bm = DataParallelBlocks(2, 6, 4)
    a, b = make(0, range(100, 109)), make(1, range(200, 209))
    for seq in (a, b):
        bm.allocate(seq)
        compute(bm, seq)
    assert (a.dp_rank, b.dp_rank) == (0, 1) and bm.active == [1, 1]
    assert bm.num_free_blocks == 6 and bm.usage == 0.5
    bm.deallocate(a)
    bm.deallocate(b)
    c = make(2, list(range(200, 208)) + [7])  # b's two full blocks, cached in rank 1's pool only
    assert bm.cached_prefix(c) == 8
    bm.allocate(c)
    assert c.dp_rank == 1 and c.num_cached_tokens == 8 and bm.active == [0, 1]
    big = make(3, range(300, 320))  # 5 blocks: only rank 0 has them free
    bm.allocate(big)
    assert big.dp_rank == 0
    d = make(4, range(400, 404))
    bm.allocate(d)  # one sequence on each rank: the one with more free blocks
    assert d.dp_rank == 1 and bm.active == [1, 2]
    assert not bm.can_allocate(make(5, range(500, 520)))
    assert not bm.reset_prefix_cache()
    for seq in (big, c, d):
        bm.deallocate(seq)
    assert bm.reset_prefix_cache() and bm.cached_prefix(make(6, list(range(200, 208)) + [7])) == 0


def test_data_parallel_preemption_frees_blocks_on_the_same_rank():
    """A sequence short of blocks preempts the newest sequence of its own rank: another rank's blocks are no use."""
    sched = scheduler(num_blocks=3, block_size=4, max_model_len=16, data_parallel_size=2)
    a = make(0, range(100, 108), max_tokens=4)  # 8 tokens: two blocks, a third for its second token
    others = [make(i, range(100 * i, 100 * i + 3), max_tokens=4) for i in range(1, 5)]  # one block each
    for seq in (a, *others):
        sched.add(seq)
    FakeRunner(sched).step()  # every prompt, and a first token each
    b, c, d, e = others
    assert [s.dp_rank for s in (a, b, c, d, e)] == [0, 1, 1, 0, 1]  # both pools full
    batch = sched.schedule()  # a needs a block: d goes back, not e, the newest of all
    assert batch.preempted == [d] and a in batch.seqs and e in batch.seqs


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make(0, range(9))
    bm.allocate(a)
    compute(bm, a)
    assert not bm.reset_prefix_cache()  # blocks in use
    bm.deallocate(a)
    assert bm.cached_prefix(make(1, range(9))) == 8
    assert bm.reset_prefix_cache() and bm.cached_prefix(make(1, range(9))) == 0


# -- scheduler -----------------------------------------------------------------------------------------------------
def test_decode_appends_block_at_boundary_and_hashes_generated_blocks():
    sched = scheduler()
    bm = sched.block_manager
    runner = FakeRunner(sched)
    sched.add(a := make(0, range(100, 104), max_tokens=10))
    runner.step()  # prefill 4 tokens: one block, first token sampled
    assert len(a.block_table) == 1 and a.num_tokens == 5
    runner.step()  # feeds position 4: a new block
    assert len(a.block_table) == 2 and a.num_computed_tokens == 5
    assert bm.block_hash[a.block_table[1]] is None
    while a.num_computed_tokens < 8:
        runner.step()
    assert len(a.block_table) == 2
    h0 = hash_block(b"", a.token_ids[:4])
    assert bm.block_hash[a.block_table[1]] == hash_block(h0, a.token_ids[4:8])  # generated tokens are cacheable
    runner.run()
    b = make(1, a.token_ids[:9])
    assert bm.cached_prefix(b) == 8


def test_chunked_prefill_keeps_decodes_running():
    sched = scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    runner = FakeRunner(sched)
    sched.add(a := make(0, range(3), max_tokens=20, ignore_eos=True))
    runner.step()
    sched.add(b := make(1, range(100, 150), max_tokens=2, ignore_eos=True))
    chunks = []
    while b.num_generated == 0:
        generated = a.num_generated
        runner.step()
        batch = runner.steps[-1]
        assert batch.seqs[0] is a and batch.num_new_tokens[0] == 1 and a.num_generated == generated + 1
        assert batch.seqs[1] is b and len(b.block_table) == 13  # all prompt blocks allocated at admission
        chunks.append((batch.num_new_tokens[1], batch.do_sample[1]))
    assert chunks == [(15, False), (15, False), (15, False), (5, True)]


def test_chunked_prefill_continues_before_new_admissions():
    sched = scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    runner = FakeRunner(sched)
    sched.add(a := make(0, range(40), max_tokens=1))
    sched.add(b := make(1, range(100, 104), max_tokens=1))
    runner.step()
    assert runner.steps[-1].seqs == [a]
    runner.step()
    runner.step()  # a: 16 + 16 + 8; b gets the 8 left in the third step
    assert runner.steps[-1].seqs == [a, b] and runner.steps[-1].num_new_tokens == [8, 4]


def test_no_chunked_prefill_waits_for_a_whole_prompt():
    sched = scheduler(max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False)
    runner = FakeRunner(sched)
    sched.add(a := make(0, range(40), max_tokens=3))
    sched.add(b := make(1, range(100, 140), max_tokens=3))
    runner.step()
    assert runner.steps[-1].seqs == [a]  # b does not fit in the 24 tokens left
    runner.step()
    assert runner.steps[-1].seqs == [a, b] and runner.steps[-1].num_new_tokens == [1, 40]


def test_limits_on_seqs_and_tokens():
    sched = scheduler(max_num_seqs=3, max_num_batched_tokens=20)
    runner = FakeRunner(sched)
    for i in range(10):
        sched.add(make(i, range(i, i + 9), max_tokens=5, ignore_eos=True))
    runner.run()  # FakeRunner asserts the limits every step
    assert max(len(b) for b in runner.steps) == 3 and max(b.num_tokens for b in runner.steps) == 20


def test_fcfs_admission_order_and_no_starvation():
    sched = scheduler(num_blocks=10)
    runner = FakeRunner(sched)
    sched.add(a := make(0, range(16), max_tokens=3, ignore_eos=True))  # 4 blocks
    runner.step()
    sched.add(big := make(1, range(100, 128), max_tokens=2))  # 7 blocks: does not fit next to a
    sched.add(small := make(2, range(200, 203), max_tokens=2))  # 1 block: would fit, but must wait its turn
    admitted = []
    while sched.has_unfinished():
        runner.step()
        admitted += [s.seq_id for s in runner.steps[-1].seqs if s.seq_id not in admitted]
        if small.num_computed_tokens:
            assert big.num_computed_tokens
    assert admitted == [0, 1, 2]


def test_no_one_token_chunk_mid_prompt():
    sched = scheduler(max_num_seqs=4, max_num_batched_tokens=4)
    runner = FakeRunner(sched)
    for i in range(3):
        sched.add(make(i, range(10 * i, 10 * i + 2), max_tokens=3, ignore_eos=True))
    runner.step()  # three 2-token prefills: 6 > 4, so the third waits
    runner.step()
    sched.add(late := make(3, range(100, 110), max_tokens=1))
    runner.step()  # three decodes leave one token of budget: late is not started with a 1-token chunk
    assert late not in runner.steps[-1].seqs and len(runner.steps[-1]) == 3
    runner.run()
    assert late.num_generated == 1


def test_admission_order_is_arrival_order():
    sched = scheduler()
    for i in [5, 3, 9, 1]:
        sched.add(make(i, range(i, i + 5)))
    assert [s.seq_id for s in sched.schedule().seqs] == [5, 3, 9, 1]


def test_rejects_requests_that_can_never_run():
    sched = scheduler(num_blocks=6, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(make(0, range(33)))
    with pytest.raises(ValueError, match="empty"):
        sched.add(make(1, []))
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add(make(2, range(20), max_tokens=6))  # 26 tokens, 25 held in the cache at most: 7 blocks of 4
    sched.add(make(3, range(20), max_tokens=5))  # 24 held: 6 blocks, fits exactly
    with pytest.raises(ValueError, match="already"):
        sched.add(make(3, range(5)))
    assert [s.seq_id for s in sched.waiting] == [3]


def test_prompt_filling_max_model_len_gets_one_token():
    sched = scheduler(max_model_len=32)
    sched.add(a := make(0, range(32), max_tokens=10))
    FakeRunner(sched).run()
    assert a.num_generated == 1 and a.finish_reason == "length"


@pytest.mark.parametrize("params, eos, tokens, expect", [
    (dict(max_tokens=10, stop_token_ids=[5]), set(), [3, 5, 7], ([3, 5], "stop")),
    (dict(max_tokens=10), {0}, [3, 0, 7], ([3, 0], "stop")),
    (dict(max_tokens=3, ignore_eos=True), {0}, [3, 0, 7, 8], ([3, 0, 7], "length")),
    (dict(max_tokens=10, ignore_eos=True, stop_token_ids=[0]), {0}, [3, 0], ([3, 0], "stop")),
    (dict(max_tokens=2), {0}, [3, 4, 5], ([3, 4], "length")),
    (dict(max_tokens=100), set(), list(range(10, 30)), (list(range(10, 22)), "length")),  # max_model_len 16
])
def test_finish_rules(params, eos, tokens, expect):
    sched = scheduler(eos=eos, max_model_len=16)
    sched.add(seq := make(0, range(4), **params))
    for t in tokens:
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        finished = sched.postprocess(batch, {0: t})
    assert (seq.generated_token_ids, seq.finish_reason) == expect
    assert finished == [seq] and seq.is_finished and sched.block_manager.num_free_blocks == 64


def test_abort_waiting_and_running_and_mid_step():
    sched = scheduler(max_num_seqs=2)
    bm = sched.block_manager
    seqs = [make(i, range(10 * i, 10 * i + 9), max_tokens=5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    sched.postprocess(sched.schedule(), {0: 1, 1: 1})
    assert bm.num_free_blocks == 64 - 6
    assert sched.abort(2) and seqs[2].finish_reason == "abort" and seqs[2].is_finished  # waiting
    assert sched.abort(0) and bm.num_free_blocks == 64 - 3  # running: blocks back at once
    batch = sched.schedule()
    assert sched.abort(1)  # while its step runs
    assert sched.postprocess(batch, {1: 1}) == [] and seqs[1].num_generated == 1
    assert bm.num_free_blocks == 64 and not sched.has_unfinished() and not sched.abort(1)
    assert [s.finish_reason for s in seqs] == ["abort"] * 3


def test_finish_for_stop_string():
    sched = scheduler()
    sched.add(a := make(0, range(9)))
    sched.postprocess(sched.schedule(), [7])
    assert sched.finish(0, "stop") and a.finish_reason == "stop" and a.finish_time is not None
    assert sched.block_manager.num_free_blocks == 64 and not sched.finish(0)


def test_timings():
    ticks = itertools.count()
    sched = Scheduler(SchedulerConfig(num_blocks=16, block_size=4, max_model_len=64), clock=lambda: next(ticks))
    sched.add(a := make(0, range(5), max_tokens=3))
    for _ in range(3):
        sched.postprocess(sched.schedule(), [1])
    assert (a.arrival_time, a.first_token_time, a.last_token_time, a.finish_time) == (0, 1, 3, 3)
    assert a.time_to_first_token == 1 and a.mean_inter_token_latency == 1


def test_n_samples_share_the_prompt_blocks():
    sched = scheduler(block_size=16, num_blocks=32)
    bm = sched.block_manager
    group = [make(i, range(40), max_tokens=4, ignore_eos=True) for i in range(4)]
    for s in group:
        sched.add(s)
    runner = FakeRunner(sched)
    runner.step()
    assert runner.steps[-1].seqs == group[:1]  # the others wait for the prompt blocks being computed
    runner.step()
    assert [s.num_cached_tokens for s in group] == [0, 32, 32, 32]
    assert [bm.ref_count[b] for b in group[0].block_table] == [4, 4, 1]
    assert runner.steps[-1].num_new_tokens == [1, 8, 8, 8]
    runner.run()
    assert [s.generated_token_ids for s in group] == [solo(s) for s in group]


def test_preemption_recomputes_and_keeps_outputs():
    sched = scheduler(num_blocks=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=24)
    seqs = [make(i, range(10 * i, 10 * i + n), max_tokens=8, ignore_eos=True) for i, n in enumerate([5, 6, 3, 7, 9])]
    for s in seqs:
        sched.add(s)
    FakeRunner(sched).run()
    assert sched.num_preemptions > 0
    assert all(s.finish_reason == "length" and s.num_generated == 8 for s in seqs)
    assert [s.generated_token_ids for s in seqs] == [solo(s) for s in seqs]
    assert sched.block_manager.num_free_blocks == 6


def test_preempts_the_newest_and_puts_it_first_in_line():
    sched = scheduler(num_blocks=4, block_size=4)
    runner = FakeRunner(sched)
    a, b, c = (make(i, range(10 * i, 10 * i + 4), max_tokens=8, ignore_eos=True) for i in range(3))
    for s in (a, b, c):
        sched.add(s)
    runner.step()  # three 1-block prompts; one block left
    sched.add(d := make(3, range(100, 104), max_tokens=1))
    runner.step()  # each decode needs a second block: a gets the free one, b gets c's
    batch = runner.steps[-1]
    assert batch.preempted == [c] and batch.seqs == [a, b] and list(sched.waiting) == [c, d]
    assert c.status is SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_generated == 1  # kept, recomputed as part of the prompt
    runner.run()
    assert [s.generated_token_ids for s in (a, b, c, d)] == [solo(s) for s in (a, b, c, d)]


@pytest.mark.parametrize("seed,ranks", [(seed, 1) for seed in range(6)] + [(6, 2), (7, 2), (8, 3)])
def test_random_workload_matches_solo_runs(seed, ranks):
    """Shared prefixes, tiny cache, chunked prefill, preemption and aborts together; also with the KV caches of
    data-parallel ranks (each sequence in one of them)."""
    rng = random.Random(seed)
    chunked = seed % 2 == 0
    max_num_seqs = rng.randint(2, 6)
    sched = scheduler(num_blocks=rng.randint(12, 24), block_size=4, max_num_seqs=max_num_seqs,
                      max_num_batched_tokens=rng.choice([max_num_seqs, 8, 16]) if chunked else 48, max_model_len=48,
                      enable_chunked_prefill=chunked, eos={0}, data_parallel_size=ranks)
    prefixes = [[rng.randrange(100, 200) for _ in range(rng.randint(0, 20))] for _ in range(3)]
    runner = FakeRunner(sched)
    seqs, aborted = [], set()
    for step in range(5000):
        if len(seqs) < 30 and rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randrange(100, 200) for _ in range(rng.randint(1, 12))]
            seqs.append(s := make(len(seqs), prompt, max_tokens=rng.randint(1, 16), ignore_eos=rng.random() < 0.5))
            sched.add(s)
        if seqs and rng.random() < 0.02:
            victim = rng.choice(seqs)
            if sched.abort(victim.seq_id):
                aborted.add(victim.seq_id)
        if sched.has_unfinished():
            runner.step()
        elif len(seqs) == 30:
            break
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == sched.config.num_blocks * ranks
    if ranks > 1:  # every rank ran sequences
        assert all(pool.hash_to_block for pool in pools(sched))
    for s in seqs:
        assert s.is_finished
        if s.seq_id not in aborted:
            assert s.generated_token_ids == solo(s, eos={0}, max_model_len=48)
            assert s.finish_reason == ("stop" if s.generated_token_ids[-1] == 0 and not s.params.ignore_eos
                                       else "length")
