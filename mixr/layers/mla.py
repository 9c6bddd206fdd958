"""Multi-head latent attention (DeepSeek-V2/V3).

K and V are rebuilt from a per-token latent of kv_lora_rank values plus one shared rotary key of
qk_rope_head_dim values; only [latent | rope key] is cached. Two equivalent ways to attend:
  expanded  latent -> kv_b_proj -> per-head K_nope and V; used for training, prefill and the reference path.
  absorbed  for decode: W_UK (the K half of kv_b_proj) is folded into the query and W_UV into the output, so
            attention runs directly over the cached rows as multi-query attention with K = [latent | rope key]
            (kv_lora_rank + qk_rope_head_dim wide) and V = latent. No per-token expansion of the cache.
"""

import torch
from torch import nn

from mixr.layers.attention import causal_attention
from mixr.layers.norm import RMSNorm
from mixr.layers.rotary import apply_rope


class MLAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, q_lora_rank: int | None, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, softmax_scale: float,
                 bias: bool = False, rope_interleaved: bool = True):
        super().__init__()
        self.num_heads, self.kv_lora_rank = num_heads, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.softmax_scale, self.rope_interleaved = softmax_scale, rope_interleaved
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.q_lora_rank = q_lora_rank
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache=None) -> torch.Tensor:
        B, L, _ = x.shape
        H, R, dn, dr, dv = self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, L, H, dn + dr).split([dn, dr], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([R, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, L, R)
        q_pe = apply_rope(q_pe, *rope, interleaved=self.rope_interleaved)
        k_pe = apply_rope(k_pe[:, :, None, :], *rope, interleaved=self.rope_interleaved)  # (B, L, 1, dr)
        row = torch.cat((latent[:, :, None, :], k_pe), dim=-1)  # (B, L, 1, R + dr): what the cache holds
        w_kv = self.kv_b_proj.weight.view(H, dn + dv, R)
        if cache is not None and cache.decode:
            q_lat = torch.einsum("blhd,hdr->blhr", q_nope, w_kv[:, :dn])  # absorb W_UK into the query
            out = cache.attention(torch.cat((q_lat, q_pe), dim=-1), positions, self.softmax_scale, row, v_dim=R)
            out = torch.einsum("blhr,hvr->blhv", out, w_kv[:, dn:])  # absorb W_UV into the output
            return self.o_proj(out.reshape(B, L, H * dv))
        k_pos = positions
        if cache is not None:
            row, k_pos = cache.update(positions, row)
        S = row.shape[1]
        latent, k_pe = row[:, :, 0].split([R, dr], dim=-1)
        k_nope, v = self.kv_b_proj(latent).view(B, S, H, dn + dv).split([dn, dv], dim=-1)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, dr)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        out = causal_attention(q, k, v, positions, k_pos, self.softmax_scale)  # (B, L, H, dv)
        return self.o_proj(out.reshape(B, L, H * dv))
