"""One request's tokens, cache blocks and timings, as the scheduler and the model runner see it."""

from __future__ import annotations

from enum import Enum, auto
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mixr.sampling imports torch; the scheduling half must not
    from mixr.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """A prompt and its generated tokens (one list), plus the state the scheduler keeps for it.

    KV positions [0, num_computed_tokens) are in the cache. A sequence that is RUNNING and not mid-prefill has
    num_computed_tokens == num_tokens - 1: its last (sampled) token is the next one fed to the model.
    """

    __slots__ = ("seq_id", "prompt_token_ids", "token_ids", "params", "status", "block_table", "block_hashes",
                 "dp_rank", "num_computed_tokens", "num_cached_tokens", "finish_reason",
                 "arrival_time", "first_token_time", "last_token_time", "finish_time")

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams):
        self.seq_id = seq_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Chained content hash of each full block of token_ids, filled lazily by the BlockManager. Tokens are
        # append-only, so these stay valid across preemption.
        self.block_hashes: list[bytes] = []
        # data-parallel attention: the rank whose KV cache holds block_table (DataParallelBlocks sets it)
        self.dp_rank = 0
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at the last admission
        self.finish_reason: str | None = None  # "stop", "length" or "abort"
        # time.monotonic() stamps, set by the scheduler
        self.arrival_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.name}, tokens={self.num_prompt_tokens}+{self.num_generated}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks(self, block_size: int) -> int:
        """Blocks needed to hold every token's KV."""
        return (len(self.token_ids) + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        """Token ids of block i (the last block may be partial)."""
        return self.token_ids[i * block_size:(i + 1) * block_size]

    # -- metrics -----------------------------------------------------------------------------------------------
    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None or self.arrival_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def mean_inter_token_latency(self) -> float | None:
        """Mean time between generated tokens after the first; None until there are two."""
        if self.num_generated < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_generated - 1)
