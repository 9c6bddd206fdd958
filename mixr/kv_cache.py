"""Contiguous per-row cache for the reference generation path.

Slot j of row b holds the entry for position j, so right-padded rows of different lengths need no extra
bookkeeping: padding writes land in slots that a real token overwrites before any query can see them
(attention only lets position p see slots <= p). The paged cache of the engine replaces this on the fast path.
"""

import torch


class ContiguousCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, shapes: list[tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device | str):
        self.buffers = [[torch.zeros(batch, max_len, *s, dtype=dtype, device=device) for s in shapes]
                        for _ in range(num_layers)]
        self.rows = torch.arange(batch, device=device)[:, None]
        self.slots = torch.arange(max_len, device=device).expand(batch, max_len)
        self.length = max_len  # slots [0, length) are attended; the caller lowers it to skip unused ones

    def layer(self, i: int) -> "LayerCache":
        return LayerCache(self, self.buffers[i])


class LayerCache:
    def __init__(self, cache: ContiguousCache, buffers: list[torch.Tensor]):
        self.cache, self.buffers = cache, buffers

    def update(self, positions: torch.Tensor, *new: torch.Tensor):
        """Store new entries (B, L, ...) at their positions (B, L); return every cached tensor (B, S, ...)
        followed by the key positions (B, S)."""
        n = self.cache.length
        for buf, x in zip(self.buffers, new, strict=True):
            buf[self.cache.rows, positions] = x.to(buf.dtype)
        return (*(buf[:, :n] for buf in self.buffers), self.cache.slots[:, :n])
