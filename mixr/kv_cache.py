"""The KV-cache interface layers see, and the contiguous cache of the reference generation path.

A layer's cache view offers two calls:
  update(positions, *entries) -> (*all_entries, key_positions)   store, then read back everything cached
  attention(q, positions, scale, k, v=None, v_dim=None) -> out   store k (and v), attend over the cache
When v is None, V is the first v_dim channels of K: MLA caches one row [latent | rope key] per token, and
absorbed MLA decode is multi-query attention with K = that row and V = its latent part.
`decode` tells MLA whether to take the absorbed path (one new token per sequence) or the expanded one.

ContiguousCache: slot j of row b holds position j, so right-padded rows of different lengths need no extra
bookkeeping: padding writes land in slots that a real token overwrites before any query can see them
(position p only sees slots <= p). The engine's paged cache implements the same interface.
"""

import torch

from mixr.layers.attention import causal_attention


class ContiguousCache:
    decode = False  # the reference path always expands MLA; the engine's decode takes the absorbed path

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
        self.decode = cache.decode  # only reference tests set it, to check MLA's absorbed path

    def update(self, positions: torch.Tensor, *new: torch.Tensor):
        """Store new entries (B, L, ...) at their positions (B, L); return every cached tensor (B, S, ...)
        followed by the key positions (B, S)."""
        n = self.cache.length
        for buf, x in zip(self.buffers, new, strict=True):
            buf[self.cache.rows, positions] = x.to(buf.dtype)
        return (*(buf[:, :n] for buf in self.buffers), self.cache.slots[:, :n])

    def attention(self, q, positions, scale, k, v=None, v_dim=None):
        return attend_cached(self, q, positions, scale, k, v, v_dim)


def attend_cached(view, q, positions, scale, k, v=None, v_dim=None):
    """Store k (and v) through view.update, then attend over everything it returns; when v is None, V is the
    first v_dim channels of the cached K rows (MLA)."""
    if v is None:
        k, k_pos = view.update(positions, k)
        v = k[..., :v_dim]
    else:
        k, v, k_pos = view.update(positions, k, v)
    return causal_attention(q, k, v, positions, k_pos, scale)
