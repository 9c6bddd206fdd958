"""Triton kernels for the fast path, each with a plain-PyTorch reference that tests and the CPU path use."""

from mixr.kernels.attention import paged_decode_attention, paged_decode_attention_ref
from mixr.kernels.fused_moe import fused_moe, fused_moe_ref

__all__ = ["fused_moe", "fused_moe_ref", "paged_decode_attention", "paged_decode_attention_ref"]
