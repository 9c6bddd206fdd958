"""Grouped-query attention (Llama, Qwen, Mixtral, OLMoE) and the masked attention both attention types share."""

import torch
import torch.nn.functional as F
from torch import nn

from mixr.layers.norm import RMSNorm
from mixr.layers.rotary import apply_rope_qk


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, L, H, D), k (B, S, Hkv, D), v (B, S, Hkv, Dv) -> (B, L, H, Dv).

    Key j is visible to query i when k_pos[j] <= q_pos[i]: one rule for training (keys are the queries),
    prefill and cached decode, and for right-padded batches whose rows have different lengths.
    """
    mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, L, S)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with grouped K/V heads.

    qk_norm: None; "head" (Qwen3: RMSNorm over each head's dims); "full" (OLMoE: over the whole projection).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: str | None = None,
                 clip_qkv: float | None = None, rms_norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.qk_norm, self.clip_qkv = qk_norm, clip_qkv
        if qk_norm == "head":
            self.q_norm = RMSNorm(head_dim, rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, rms_norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(num_heads * head_dim, rms_norm_eps)
            self.k_norm = RMSNorm(num_kv_heads * head_dim, rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache=None) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, L, self.num_heads, self.head_dim)
        k = k.view(B, L, self.num_kv_heads, self.head_dim)
        v = v.view(B, L, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_qk(q, k, *rope)
        scale = self.head_dim ** -0.5
        if cache is None:
            out = causal_attention(q, k, v, positions, positions, scale)  # (B, L, H, D)
        else:
            out = cache.attention(q, positions, scale, k, v)
        return self.o_proj(out.reshape(B, L, -1))
