"""Paged KV storage and the per-step views layers attend through.

Each layer owns tensors of shape (num_blocks + 1, block_size, *entry_shape). Block `num_blocks` is scratch:
padding tokens (rows added to reach a CUDA-graph batch size, or right padding in a prefill batch) write there,
so no step needs a data-dependent mask. For MLA the entry is one row [latent | rope key] of
kv_lora_rank + qk_rope_head_dim values: the compressed cache, never expanded K/V.

kv_dtype float8_e4m3fn (EngineConfig.kv_cache_dtype="fp8") halves a bf16 cache: stores write e4m3(x / kv_scale)
(saturated at +-448), prefill reads dequantize to the model dtype, and the decode kernel reads e4m3 directly.
"""

from dataclasses import dataclass

import torch

from mixr.kernels.attention import paged_decode_attention
from mixr.kv_cache import attend_cached, dequantize_kv, quantize_kv


class PagedCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, entry_shapes: list[tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device, kv_dtype: torch.dtype | None = None,
                 kv_scale: float = 1.0):
        """dtype: the model's (what readers get back); kv_dtype: what is stored (default: dtype)."""
        self.dtype, self.kv_dtype, self.kv_scale = dtype, kv_dtype or dtype, kv_scale
        self.layers = [[torch.zeros(num_blocks + 1, block_size, *s, dtype=self.kv_dtype, device=device)
                        for s in entry_shapes] for _ in range(num_layers)]
        self.scratch_slot = num_blocks * block_size

    @staticmethod
    def bytes_per_token(num_layers: int, entry_shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
        return num_layers * sum(torch.Size(s).numel() for s in entry_shapes) * dtype.itemsize


@dataclass
class StepMeta:
    """Device tensors describing one forward over a (B, L) right-padded batch.

    slots (B, L): cache slot of every input token (scratch for padding). For decode (L == 1),
    block_tables (B, max_blocks) and context_lens (B,) feed the paged kernel; for prefill, gather (B, S) lists
    the slots of each row's whole context (cached prefix + this chunk) so attention can read it back.
    """
    decode: bool
    slots: torch.Tensor
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    gather: torch.Tensor | None = None


class PagedStep:
    """What the model's `cache` argument is during an engine forward."""

    def __init__(self, cache: PagedCache, meta: StepMeta):
        self.cache, self.meta, self.decode = cache, meta, meta.decode

    def layer(self, i: int) -> "PagedLayer":
        return PagedLayer(self, self.cache.layers[i])


class PagedLayer:
    def __init__(self, step: PagedStep, buffers: list[torch.Tensor]):
        self.meta, self.buffers, self.decode = step.meta, buffers, step.decode
        self.dtype, self.kv_scale = step.cache.dtype, step.cache.kv_scale

    def _store(self, new: tuple[torch.Tensor, ...]) -> None:
        slots = self.meta.slots.reshape(-1)
        for buf, x in zip(self.buffers, new, strict=True):
            flat = buf.view(-1, *buf.shape[2:])
            quantize_kv(flat, slots, x.reshape(-1, *buf.shape[2:]), self.kv_scale)

    def update(self, positions: torch.Tensor, *new: torch.Tensor):
        """Prefill: store this chunk, then read back each row's whole context (B, S, ...) in position order."""
        self._store(new)
        gather = self.meta.gather
        out = [dequantize_kv(buf.view(-1, *buf.shape[2:])[gather], self.dtype, self.kv_scale) for buf in self.buffers]
        k_pos = torch.arange(gather.shape[1], device=gather.device).expand_as(gather)
        return (*out, k_pos)

    def decode_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a layer that writes its new entries into the cache itself (MLA's absorbed decode, from the rope
        kernel): (entry 0's rows (slots, *entry), the slot of each new token (B*L,)), or None when entries must
        pass through attention()'s store (prefill, or an FP8 cache, which quantizes them)."""
        buf = self.buffers[0]
        if not self.decode or buf.dtype != self.dtype:
            return None
        return buf.view(-1, *buf.shape[2:]), self.meta.slots.reshape(-1)

    def attention(self, q, positions, scale, k, v=None, v_dim=None, v_proj=None):
        """k None: the layer already wrote its entries through decode_rows(). v_proj (H, Dp, Dv): return each head's
        output times its matrix (absorbed MLA's W_UV; see paged_decode_attention)."""
        if not self.decode:
            return attend_cached(self, q, positions, scale, k, v, v_dim, v_proj)
        if k is not None:
            self._store((k,) if v is None else (k, v))
        k_cache = self.buffers[0]
        v_cache = k_cache[..., :v_dim] if v is None else self.buffers[1]
        out = paged_decode_attention(q[:, 0], k_cache, v_cache, self.meta.block_tables, self.meta.context_lens, scale,
                                     kv_scale=self.kv_scale, v_proj=v_proj)
        return out[:, None]  # (B, 1, H, Dv or Dp)
