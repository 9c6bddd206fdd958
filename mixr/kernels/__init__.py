"""Triton kernels for the fast path, each with a plain-PyTorch reference that tests and the CPU path use."""

from mixr.kernels.attention import paged_decode_attention, paged_decode_attention_ref
from mixr.kernels.fused_moe import fused_moe, fused_moe_ref
from mixr.kernels.norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from mixr.kernels.rope import apply_rope_qk, rope_ref
from mixr.kernels.router import fused_route, route_ref

__all__ = ["add_rms_norm", "add_rms_norm_ref", "apply_rope_qk", "fused_moe", "fused_moe_ref", "fused_route",
           "paged_decode_attention", "paged_decode_attention_ref", "rms_norm", "rms_norm_ref", "rope_ref", "route_ref"]
