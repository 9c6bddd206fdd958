"""The KV-cache interface layers see, and the contiguous cache of the reference generation path.

A layer's cache view offers three calls:
  update(positions, *entries) -> (*all_entries, key_positions)   store, then read back everything cached
  attention(q, positions, scale, k, v=None, v_dim=None, v_proj=None) -> out
                                                                 store k (and v), attend over the cache
  decode_rows() -> (rows, slots) or None                         where to write new entries directly, if allowed
When v is None, V is the first v_dim channels of K: MLA caches one row [latent | rope key] per token, and
absorbed MLA decode is multi-query attention with K = that row and V = its latent part. v_proj (H, Dp, Dv) multiplies
each head's output by its own matrix (absorbed MLA's W_UV), which the paged decode kernel fuses with its split merge.
k None means the layer wrote its entries through decode_rows() (the paged cache's decode steps only).
`decode` tells MLA whether to take the absorbed path (one new token per sequence) or the expanded one.

ContiguousCache: slot j of row b holds position j, so right-padded rows of different lengths need no extra
bookkeeping: padding writes land in slots that a real token overwrites before any query can see them
(position p only sees slots <= p). The engine's paged cache implements the same interface.

FP8 caches (kv_dtype float8_e4m3fn) store e4m3(x / kv_scale), saturated at +-448, and hand back x's dtype.
Why a per-tensor kv_scale of 1.0 (vLLM's default, also for DeepSeek's MLA cache): e4m3 keeps the same relative
precision (3 mantissa bits, rounding error <= 2^-4) for every magnitude from 2^-6 to 448, so a scale only slides
that window. MLA's latent leaves an RMSNorm, so its rms is the norm weight's, O(1): the window then spans 1/64 to
448 times the rms, and smaller entries (absolute error <= 2^-10) barely move a dot product dominated by the large
ones. Values past 448 saturate instead of becoming NaN.
"""

import torch

from mixr.layers.attention import causal_attention

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def to_kv(x: torch.Tensor, kv_dtype: torch.dtype, kv_scale: float = 1.0) -> torch.Tensor:
    """What a cache of kv_dtype stores for x: e4m3(x / kv_scale) saturated (e4m3fn has no inf), else x cast."""
    if kv_dtype != torch.float8_e4m3fn:
        return x.to(kv_dtype)
    if kv_scale != 1.0:
        x = x.float() / kv_scale
    return x.clamp(-FP8_MAX, FP8_MAX).to(kv_dtype)


def dequantize_kv(x: torch.Tensor, dtype: torch.dtype, kv_scale: float = 1.0) -> torch.Tensor:
    """Cached entries -> the model dtype (a no-op for unquantized caches)."""
    if x.dtype != torch.float8_e4m3fn:
        return x
    x = x.to(dtype)
    return x * kv_scale if kv_scale != 1.0 else x


def quantize_kv(dst: torch.Tensor, index: torch.Tensor, x: torch.Tensor, kv_scale: float = 1.0) -> None:
    """dst.index_copy_(0, index, x) into a cache of any dtype (float8 copied as bytes: CPU has no float8 kernel)."""
    q = to_kv(x, dst.dtype, kv_scale)
    if dst.dtype == torch.float8_e4m3fn:
        dst.view(torch.uint8).index_copy_(0, index, q.view(torch.uint8))
    else:
        dst.index_copy_(0, index, q)


class ContiguousCache:
    decode = False  # the reference path always expands MLA; the engine's decode takes the absorbed path

    def __init__(self, num_layers: int, batch: int, max_len: int, shapes: list[tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device | str, kv_dtype: torch.dtype | None = None,
                 kv_scale: float = 1.0):
        """dtype: the model's (what update returns); kv_dtype: what is stored (default: dtype)."""
        self.dtype, self.kv_dtype, self.kv_scale = dtype, kv_dtype or dtype, kv_scale
        self.buffers = [[torch.zeros(batch, max_len, *s, dtype=self.kv_dtype, device=device) for s in shapes]
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
        c = self.cache
        n = c.length
        for buf, x in zip(self.buffers, new, strict=True):
            buf[c.rows, positions] = to_kv(x, buf.dtype, c.kv_scale)
        return (*(dequantize_kv(buf[:, :n], c.dtype, c.kv_scale) for buf in self.buffers), c.slots[:, :n])

    def decode_rows(self):
        return None  # entries go through update()

    def attention(self, q, positions, scale, k, v=None, v_dim=None, v_proj=None):
        return attend_cached(self, q, positions, scale, k, v, v_dim, v_proj)


def attend_cached(view, q, positions, scale, k, v=None, v_dim=None, v_proj=None):
    """Store k (and v) through view.update, then attend over everything it returns; when v is None, V is the
    first v_dim channels of the cached K rows (MLA). v_proj (H, Dp, Dv): out[..., h, :] @ v_proj[h].T."""
    if v is None:
        k, k_pos = view.update(positions, k)
        v = k[..., :v_dim]
    else:
        k, v, k_pos = view.update(positions, k, v)
    out = causal_attention(q, k, v, positions, k_pos, scale)
    return out if v_proj is None else torch.einsum("blhd,hpd->blhp", out, v_proj)
