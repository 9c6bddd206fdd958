"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, and a prefix cache of full blocks.

A block is shared only once it is full and its KV is computed (`commit`), so a shared block is never written
again: sequences write only positions >= num_computed_tokens, which lie in blocks of their own.
"""

import hashlib
from array import array
from collections import OrderedDict

from mixr.engine.sequence import Sequence


def slot_mapping(block_table: list[int], block_size: int, start: int, end: int) -> list[int]:
    """Cache slots of token positions [start, end): block_id * block_size + offset."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def hash_block(prev: bytes, token_ids: list[int]) -> bytes:
    """Content hash of one full block, chained on the previous block's hash so it names the whole prefix."""
    # 128-bit blake2b: a collision (two prefixes sharing KV) is far less likely than a hardware error.
    return hashlib.blake2b(prev + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    """Owns the ids of num_blocks KV blocks of block_size tokens each; the runner owns the memory.

    Token position p of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # block_hash[b] == h exactly when hash_to_block[h] == b: the block holds that prefix's KV and may be shared.
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Full blocks allocated to a running sequence whose KV is not computed yet. A waiting sequence that would
        # hit one waits a step (see `prefix_pending`) rather than compute the same prompt again: n samples of
        # one prompt, or many requests with one system prompt, then compute it once.
        self.pending: dict[bytes, int] = {}
        # Free blocks, least recently freed first. A freed block keeps its hash, so it is still a cache hit,
        # until it is taken for new data: eviction is LRU.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (free cached blocks count as free)."""
        return 1 - len(self.free) / self.num_blocks

    # -- prefix cache ------------------------------------------------------------------------------------------
    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The chained hashes of seq's first n full blocks; computed once per sequence (tokens are append-only)."""
        hs, bs = seq.block_hashes, self.block_size
        while len(hs) < n:
            i = len(hs)
            hs.append(hash_block(hs[-1] if hs else b"", seq.token_ids[i * bs:(i + 1) * bs]))
        return hs

    def _match(self, seq: Sequence) -> list[int]:
        """Blocks of seq's longest cached prefix.

        At most (num_tokens - 1) // block_size blocks: the last token is always computed, since its logits give
        the next token. So when a whole block-aligned prompt is cached, its last block is not shared but
        recomputed into a fresh block (at most block_size tokens of extra work, and no copy-on-write).
        """
        if not self.enable_prefix_caching:
            return []
        n = (seq.num_tokens - 1) // self.block_size
        hits = []
        for h in self._hashes(seq, n)[:n]:
            if (b := self.hash_to_block.get(h)) is None:
                break
            hits.append(b)
        return hits

    def cached_prefix(self, seq: Sequence) -> int:
        """How many of seq's tokens `allocate` would serve from the cache now."""
        return len(self._match(seq)) * self.block_size

    def prefix_pending(self, seq: Sequence) -> bool:
        """Whether the next block seq could share is still being computed for a running sequence."""
        if not self.enable_prefix_caching or not self.pending:
            return False
        n = (seq.num_tokens - 1) // self.block_size
        hits = len(self._match(seq))
        return hits < n and seq.block_hashes[hits] in self.pending

    def commit(self, seq: Sequence, start: int) -> None:
        """Positions [start, seq.num_computed_tokens) were just computed: register the blocks that are now full
        so that later sequences (and this one, after preemption) can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first, end = start // bs, seq.num_computed_tokens // bs
        if first >= end:
            return
        hashes = self._hashes(seq, end)
        for i in range(first, end):
            b, h = seq.block_table[i], hashes[i]
            if self.block_hash[b] is not None:  # a prefix hit: registered already
                continue
            if self.pending.get(h) == b:
                del self.pending[h]
            # The same tokens may have been computed twice (by sequences admitted together); keep the first.
            if h not in self.hash_to_block:
                self.block_hash[b] = h
                self.hash_to_block[h] = b

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (e.g. after a weight update); only possible while no block is in use."""
        if len(self.free) != self.num_blocks:
            return False
        self.hash_to_block.clear()
        self.pending.clear()
        self.block_hash = [None] * self.num_blocks
        return True

    # -- allocation --------------------------------------------------------------------------------------------
    def _take(self) -> int:
        """The least recently freed block, evicting its cached prefix."""
        if not self.free:
            raise RuntimeError("out of KV blocks")
        b, _ = self.free.popitem(last=False)
        if (h := self.block_hash[b]) is not None:
            del self.hash_to_block[h]
            self.block_hash[b] = None
        self.ref_count[b] = 1
        return b

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._match(seq)
        # A hit on a free cached block takes it off the free list as well; a hit on a block in use costs nothing.
        need = seq.num_blocks(self.block_size) - sum(self.ref_count[b] > 0 for b in hits)
        return need <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens at once (chunked prefill then only computes into them), sharing its
        longest cached prefix. Sets block_table, num_cached_tokens and num_computed_tokens."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already has blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough free blocks for sequence {seq.seq_id}")
        hits = self._match(seq)
        for b in hits:  # claim the hits before taking new blocks, which could evict them
            if self.ref_count[b] == 0:
                del self.free[b]
            self.ref_count[b] += 1
        table = hits + [self._take() for _ in range(seq.num_blocks(self.block_size) - len(hits))]
        seq.block_table = table
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_prefix_caching:
            full = seq.num_tokens // self.block_size
            hashes = self._hashes(seq, full)
            for i in range(len(hits), full):
                if hashes[i] not in self.hash_to_block:
                    self.pending.setdefault(hashes[i], table[i])

    def deallocate(self, seq: Sequence) -> None:
        """Drop seq's blocks. Blocks nobody else holds go to the free list and keep their hash for reuse."""
        # Tail first: when evicting, a prefix's last blocks go before its first ones, which more requests share.
        for i in reversed(range(len(seq.block_table))):
            b = seq.block_table[i]
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                self.free[b] = None
                if i < len(seq.block_hashes) and self.pending.get(seq.block_hashes[i]) == b:
                    del self.pending[seq.block_hashes[i]]
        seq.block_table = []

    def same_pool(self, a: Sequence, b: Sequence) -> bool:
        """Whether freeing a's blocks can give b blocks (always, with one pool)."""
        return True

    def can_append(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether the blocks for seq's next step (all of its tokens, the last one to be fed) can be had.
        ahead: count that many tokens more, not yet sampled (async scheduling)."""
        return self.blocks_needed(seq, ahead) - len(seq.block_table) <= len(self.free)

    def may_append(self, seq: Sequence, ahead: int = 0) -> None:
        """Add a block when seq's last token starts a new one. The block is registered for sharing by `commit`
        once it is full and computed, so generated tokens are cacheable too."""
        while len(seq.block_table) < self.blocks_needed(seq, ahead):
            seq.block_table.append(self._take())

    def blocks_needed(self, seq: Sequence, ahead: int = 0) -> int:
        """Blocks that hold all of seq's tokens and `ahead` more."""
        return -(-(seq.num_tokens + ahead) // self.block_size)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of token positions [start, end): block_id * block_size + offset."""
        if not 0 <= start <= end <= len(seq.block_table) * self.block_size:
            raise ValueError(f"positions [{start}, {end}) outside the {len(seq.block_table)} blocks of sequence "
                             f"{seq.seq_id}")
        return slot_mapping(seq.block_table, self.block_size, start, end)


class DataParallelBlocks:
    """The block managers of data-parallel attention's ranks, each rank's KV cache its own pool of num_blocks
    blocks, behind BlockManager's interface. A sequence's blocks all come from one pool, `seq.dp_rank`, chosen when
    it is allocated: the rank running the fewest sequences (decode batches are padded to the largest rank's), then
    the one with the longest cached prefix, then the most free blocks. Prefix caching works within a pool."""

    def __init__(self, pools: int, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.pools = [BlockManager(num_blocks, block_size, enable_prefix_caching) for _ in range(pools)]
        self.num_blocks = pools * num_blocks  # in all
        self.block_size = block_size
        self.active = [0] * pools  # sequences holding blocks, per pool

    @property
    def num_free_blocks(self) -> int:
        return sum(p.num_free_blocks for p in self.pools)

    @property
    def usage(self) -> float:
        return sum(p.usage for p in self.pools) / len(self.pools)

    def _choose(self, seq: Sequence) -> int:
        """The rank whose pool a waiting sequence would be allocated from."""
        return min(range(len(self.pools)), key=lambda r: (not self.pools[r].can_allocate(seq), self.active[r],
                                                           -self.pools[r].cached_prefix(seq),
                                                           -self.pools[r].num_free_blocks))

    def cached_prefix(self, seq: Sequence) -> int:
        return self.pools[self._choose(seq)].cached_prefix(seq)

    def prefix_pending(self, seq: Sequence) -> bool:
        return self.pools[self._choose(seq)].prefix_pending(seq)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.pools[self._choose(seq)].can_allocate(seq)

    def allocate(self, seq: Sequence) -> None:
        seq.dp_rank = self._choose(seq)
        self.pools[seq.dp_rank].allocate(seq)
        self.active[seq.dp_rank] += 1

    def deallocate(self, seq: Sequence) -> None:
        if seq.block_table:
            self.active[seq.dp_rank] -= 1
        self.pools[seq.dp_rank].deallocate(seq)

    def commit(self, seq: Sequence, start: int) -> None:
        self.pools[seq.dp_rank].commit(seq, start)

    def same_pool(self, a: Sequence, b: Sequence) -> bool:
        return a.dp_rank == b.dp_rank

    def can_append(self, seq: Sequence, ahead: int = 0) -> bool:
        return self.pools[seq.dp_rank].can_append(seq, ahead)

    def may_append(self, seq: Sequence, ahead: int = 0) -> None:
        self.pools[seq.dp_rank].may_append(seq, ahead)

    def blocks_needed(self, seq: Sequence, ahead: int = 0) -> int:
        return self.pools[seq.dp_rank].blocks_needed(seq, ahead)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        return self.pools[seq.dp_rank].slots(seq, start, end)

    def reset_prefix_cache(self) -> bool:
        if any(p.num_free_blocks != p.num_blocks for p in self.pools):
            return False
        return all([p.reset_prefix_cache() for p in self.pools])
