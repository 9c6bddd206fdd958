"""Continuous batching over a paged KV cache: which sequences run this step, and how many tokens each.

One engine step is: `batch = scheduler.schedule()`, the runner computes it and samples a token for each row
with do_sample, `scheduler.postprocess(batch, sampled)`. No torch here.
"""

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mixr.engine.block_manager import BlockManager, DataParallelBlocks
from mixr.engine.sequence import Sequence, SequenceStatus

WAITING, RUNNING, FINISHED = SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.FINISHED


@dataclass(slots=True, kw_only=True)
class SchedulerConfig:
    """Engine scheduling limits. num_blocks (KV blocks of block_size tokens) comes from the runner's memory."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_blocks: int
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_model_len: int
    # data-parallel attention: that many KV caches of num_blocks blocks each, a sequence in one of them
    # (block_manager.DataParallelBlocks); the limits above are for all ranks together
    data_parallel_size: int = 1

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks", "max_model_len",
                     "data_parallel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes a token each step")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must "
                             f"be >= max_model_len ({self.max_model_len}), or a long prompt could never run")


@dataclass(slots=True)
class ScheduledBatch:
    """What to compute this step. Row i feeds seqs[i].token_ids at positions [start_positions[i],
    start_positions[i] + num_new_tokens[i]) and writes their KV to the slots `BlockManager.slots` gives;
    when do_sample[i] the row reaches the sequence's last token and its logits give the next token.
    Decode rows come first, then prefill chunks. A row of one token is always at its sequence's end
    (start == num_tokens - 1, do_sample): the scheduler never makes a one-token chunk mid-prompt, so runners
    may treat every one-token row as a decode. `preempted` lists the sequences sent back to the
    waiting queue this step (their blocks are freed already)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    start_positions: list[int] = field(default_factory=list)
    do_sample: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.start_positions.append(start)
        self.do_sample.append(start + n == seq.num_tokens)


class Scheduler:
    """Continuous batching, decode first, prefill first-come-first-served, recompute preemption.

    Each step every running sequence that is decoding gets one token; when its next block cannot be had, the
    most recently admitted running sequence is preempted: its blocks are freed, and it goes back to the front
    of the waiting queue with its generated tokens kept, to be recomputed as a longer prompt (the prefix cache
    often still holds its blocks). The rest of the token budget goes to prefills: first those under way
    (chunked prefill), then new sequences in arrival order while blocks and max_num_seqs allow. A sequence that
    does not fit blocks the ones behind it, so big requests are not starved.

    n samples of one prompt: add n sequences with the same prompt. The first computes the prompt; the others
    wait at the head of the queue until its blocks are computed (`BlockManager.prefix_pending`) and then share
    them through the prefix cache, so the prompt is computed once.
    """

    def __init__(self, config: SchedulerConfig, eos_token_ids: set[int] | frozenset[int] = frozenset(),
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        self.clock = clock
        if config.data_parallel_size > 1:
            self.block_manager = DataParallelBlocks(config.data_parallel_size, config.num_blocks, config.block_size,
                                                    config.enable_prefix_caching)
        else:
            self.block_manager = BlockManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.seqs: dict[int, Sequence] = {}  # unfinished sequences by id
        self.num_preemptions = 0

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. Raises ValueError for one that could never run: empty, longer than
        max_model_len, or needing more KV blocks than the whole cache has."""
        c = self.config
        if seq.seq_id in self.seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already queued")
        if seq.status is not WAITING or seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"sequence {seq.seq_id} is not new")
        if not seq.prompt_token_ids:
            raise ValueError("prompt is empty")
        if seq.num_tokens > c.max_model_len:
            raise ValueError(f"prompt has {seq.num_tokens} tokens, more than max_model_len={c.max_model_len}")
        # Most tokens held in the cache at once: all but the last of its final tokens (the last is never fed),
        # or the whole prompt when it already fills max_model_len.
        final = min(seq.num_prompt_tokens + seq.params.max_tokens, c.max_model_len)
        need = -(-max(seq.num_tokens, final - 1) // c.block_size)
        if need > c.num_blocks:
            raise ValueError(f"sequence {seq.seq_id} may need {need} KV blocks of {c.block_size} tokens "
                             f"({final} tokens) but the cache has only {c.num_blocks}")
        if seq.arrival_time is None:
            seq.arrival_time = self.clock()
        self.waiting.append(seq)
        self.seqs[seq.seq_id] = seq

    def abort(self, seq_id: int) -> bool:
        """Finish a sequence now with reason "abort", waiting or running, freeing its blocks. False if unknown."""
        return self.finish(seq_id, "abort")

    def finish(self, seq_id: int, reason: str = "stop") -> bool:
        """Finish a sequence now, e.g. when the engine finds a stop string in its text. False if unknown."""
        if (seq := self.seqs.get(seq_id)) is None:
            return False
        self._finish(seq, reason)
        return True

    # -- one step ----------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """Pick this step's rows; blocks for them are allocated, the tokens are computed by the runner."""
        c, bm = self.config, self.block_manager
        batch = ScheduledBatch()
        budget = c.max_num_batched_tokens  # >= max_num_seqs, so every decode fits

        # decodes, oldest first
        for seq in list(self.running):
            if seq.status is not RUNNING or seq.num_tokens - seq.num_computed_tokens != 1:
                continue  # preempted by an older one just now, or mid-prefill
            while not bm.can_append(seq):
                # the newest sequence whose blocks would help: under data-parallel attention, one on seq's rank
                victim = next(v for v in reversed(self.running) if bm.same_pool(v, seq))
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is RUNNING:
                bm.may_append(seq)
                batch.add(seq, 1)
                budget -= 1

        # prefills under way (chunked), oldest first; their blocks were all allocated at admission
        for seq in self.running:
            if budget == 0:
                break
            if (remaining := seq.num_tokens - seq.num_computed_tokens) > 1:
                if budget < 2:
                    break  # no one-token chunks mid-prompt (see ScheduledBatch)
                n = min(remaining, budget)
                batch.add(seq, n)
                budget -= n

        # new sequences, first come first served. None after a preemption: there are no blocks to spare.
        while self.waiting and budget > 0 and len(self.running) < c.max_num_seqs and not batch.preempted:
            seq = self.waiting[0]
            if bm.prefix_pending(seq):
                break  # its prefix is being computed for another sequence: share it from the next step
            remaining = seq.num_tokens - bm.cached_prefix(seq)
            if remaining > budget and (not c.enable_chunked_prefill or budget < 2):
                break  # the prompt must fit whole, or in a chunk of at least two tokens
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = RUNNING
            self.running.append(seq)
            n = min(remaining, budget)
            batch.add(seq, n)
            budget -= n
        return batch

    def schedule_ahead(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """The step after `batch` (scheduled, not yet postprocessed), planned before its tokens are known, so that
        the runner can queue it behind `batch` (async scheduling): the same sequences, each one token further on,
        except those that `batch`'s token ends by length. Blocks for the unknown token are taken now.

        None when the next step may be another one: sequences waiting or mid-prefill (admission is `schedule`'s),
        or too few free blocks (preemption is too). A sequence that `batch`'s token ends by a stop token is in the
        plan; `postprocess` then skips its row and the row's work is wasted."""
        c, bm = self.config, self.block_manager
        if self.waiting or not batch.seqs or any(n != 1 for n in batch.num_new_tokens):
            return None
        seqs = [s for s in batch.seqs if s.status is RUNNING]
        if len(seqs) != len(self.running):
            return None  # someone else is running (admitted since `batch`?): let `schedule` decide
        seqs = [s for s in seqs if s.num_generated + 1 < s.params.max_tokens and s.num_tokens + 1 < c.max_model_len]
        if not seqs or sum(bm.blocks_needed(s, 1) - len(s.block_table) for s in seqs) > bm.num_free_blocks:
            return None
        ahead = ScheduledBatch()
        for s in seqs:
            bm.may_append(s, ahead=1)
            ahead.seqs.append(s)
            ahead.num_new_tokens.append(1)
            ahead.start_positions.append(s.num_tokens)
            ahead.do_sample.append(True)
        return ahead

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int] | list[int | None]) -> list[Sequence]:
        """Record a computed step. sampled holds the token of each do_sample row, by seq_id (dict) or by row
        (list, None for the other rows). Returns the sequences that finished this step (their blocks are freed);
        rows finished or aborted while the step ran are skipped."""
        now = self.clock()
        finished = []
        for i, seq in enumerate(batch.seqs):
            if seq.status is not RUNNING:
                continue
            start = batch.start_positions[i]
            if seq.num_computed_tokens != start:
                raise RuntimeError(f"sequence {seq.seq_id} is at position {seq.num_computed_tokens}, the batch at "
                                   f"{start}: was this batch postprocessed already?")
            seq.num_computed_tokens = start + batch.num_new_tokens[i]
            self.block_manager.commit(seq, start)
            if not batch.do_sample[i]:
                continue  # a prefill chunk: no token yet
            token = sampled[seq.seq_id] if isinstance(sampled, dict) else sampled[i]
            if token is None:
                raise ValueError(f"no token sampled for sequence {seq.seq_id}")
            seq.token_ids.append(token)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            if reason := self._finish_reason(seq, token):
                self._finish(seq, reason, now)
                finished.append(seq)
        return finished

    # -- helpers -----------------------------------------------------------------------------------------------
    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_generated >= p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, now: float | None = None) -> None:
        if seq.status is RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status, seq.finish_reason = FINISHED, reason
        seq.finish_time = self.clock() if now is None else now
        del self.seqs[seq.seq_id]

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it first in line; its tokens (generated ones too) are recomputed later."""
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.num_computed_tokens = 0
        seq.status = WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
