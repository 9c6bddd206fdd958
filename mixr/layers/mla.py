"""Multi-head latent attention (DeepSeek-V2/V3).

K and V are rebuilt from a per-token latent of kv_lora_rank values plus one shared rotary key of
qk_rope_head_dim values; only [latent | rope key] is cached. Two equivalent ways to attend:
  expanded  latent -> kv_b_proj -> per-head K_nope and V; used for training, prefill and the reference path.
  absorbed  for decode: W_UK (the K half of kv_b_proj) is folded into the query and W_UV into the output, so
            attention runs directly over the cached rows as multi-query attention with K = [latent | rope key]
            (kv_lora_rank + qk_rope_head_dim wide) and V = latent. No per-token expansion of the cache.
"""

import torch
import torch.nn.functional as F
from torch import nn

from mixr.kernels.quant_gemm import quant_linear
from mixr.layers.attention import causal_attention
from mixr.layers.norm import RMSNorm
from mixr.layers.rotary import apply_rope_qk
from mixr.quant.modules import QuantLinear


def _fusable(a: nn.Module, b: nn.Module) -> list[str] | None:
    """The tensors to concatenate by rows to run linears a and b as one: both bias-free plain nn.Linear on one dtype
    and device (weight), or both bias-free QuantLinears in one format (qweight, scales and any zeros)."""
    if a.bias is not None or b.bias is not None:
        return None
    if type(a) is type(b) is nn.Linear:
        same = (a.weight.dtype, a.weight.device) == (b.weight.dtype, b.weight.device)
        return ["weight"] if same else None
    if type(a) is type(b) is QuantLinear and a.spec == b.spec and a.scales.dtype == b.scales.dtype \
            and a.qweight.device == b.qweight.device:
        return ["qweight", "scales"] + (["zeros"] if a.spec.zero_point else [])
    return None


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
        self._fused_in = None  # see fuse_input_projections

    def fuse_input_projections(self) -> bool:
        """For inference: one GEMM instead of two for the projections that read x (q_proj, or q_a_proj with a
        q_lora_rank, and kv_a_proj_with_mqa), vLLM's fused_qkv_a_proj. Their weights (or, for two QuantLinears in
        one format, their packed qweight / scales / zeros) become the row blocks of one tensor; the modules keep
        theirs as views of it (same objects, same names), so in-place weight updates reach it. Returns False,
        changing nothing, unless both are bias-free plain nn.Linear on one dtype and device, or both such
        QuantLinears. The forward uses the fused tensors only while the modules' tensors still view them (not after
        `.to()`, say), with no gradients wanted and no hooks on either module."""
        q, kv = self._input_linears()
        names = _fusable(q, kv)
        if names is None:
            return False
        fused = {}
        for name in names:
            a, b = getattr(q, name), getattr(kv, name)
            w = torch.cat((a.detach(), b.detach()))
            a.data, b.data = w[:a.shape[0]], w[a.shape[0]:]  # .data: the Parameter / buffer objects stay
            fused[name] = w
        self._fused_in = fused
        return True

    def _input_linears(self) -> tuple[nn.Module, nn.Module]:
        return self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa

    def _project_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, kv = self._input_linears()
        fused = self._fused_in
        if (fused is not None
                and all(getattr(q, n).data_ptr() == w.data_ptr()
                        and getattr(kv, n).data_ptr() == w.data_ptr() + getattr(q, n).nbytes for n, w in fused.items())
                and not (torch.is_grad_enabled() and any(p.requires_grad for p in (*q.parameters(), *kv.parameters())))
                and not any(m._forward_hooks or m._forward_pre_hooks for m in (q, kv))):
            if "weight" in fused:
                y = F.linear(x, fused["weight"])
            else:
                y = quant_linear(x, fused["qweight"], fused["scales"], fused.get("zeros"), q.spec.bits)
            return y.split((q.out_features, kv.out_features), dim=-1)  # strided views
        return q(x), kv(x)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cache=None) -> torch.Tensor:
        B, L, _ = x.shape
        H, R, dn, dr, dv = self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        q, kv = self._project_inputs(x)  # kv (B, L, R + dr): [latent | rope key]
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(B, L, H, dn + dr)
        w_kv = self.kv_b_proj.weight.view(H, dn + dv, R)
        if cache is not None and cache.decode:
            return self._absorbed(q, kv, w_kv, positions, rope, cache)
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        latent, k_pe = kv.split([R, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, L, R)
        q_pe, k_pe = apply_rope_qk(q_pe, k_pe[:, :, None, :], *rope, interleaved=self.rope_interleaved)
        row = torch.cat((latent[:, :, None, :], k_pe), dim=-1)  # (B, L, 1, R + dr): what the cache holds
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

    def _absorbed(self, q: torch.Tensor, kv: torch.Tensor, w_kv: torch.Tensor, positions: torch.Tensor,
                  rope: tuple[torch.Tensor, torch.Tensor], cache) -> torch.Tensor:
        """Decode: W_UK folded into the query, W_UV into the output, attention over the cached rows as MQA.

        Inference only (it writes into preallocated buffers, which autograd cannot follow). The query
        [q_nope W_UK | rotated q_pe] and the cache row [normed latent | rotated k_pe] are assembled in place: the
        latent norm, the q and k rotations and (for a few tokens) the absorption GEMV are one kernel, each part
        writing its slices, so no cat or contiguous copy runs between them: decode at batch 1 is a chain of small kernels, each of which
        costs a few microseconds whatever it does. Where the cache allows (`decode_rows`), that kernel writes the
        row straight into its cache slot, and W_UV goes to the attention call, whose split merge applies it.
        """
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, kv, w_kv)):
            raise RuntimeError("MLA's absorbed decode is inference-only: run it under torch.no_grad or "
                               "torch.inference_mode")
        B, L = q.shape[:2]
        H, R, dn, dr, dv = self.num_heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        q_full = q.new_empty(B, L, H, R + dr)
        direct = cache.decode_rows()
        if direct is None:
            row = kv.new_empty(B, L, 1, R + dr)
            k_out, latent_out, slots = row[..., R:], row[:, :, 0, :R], None
        else:
            rows, slots = direct  # rows (cache slots, 1, R + dr)
            row, k_out, latent_out = None, rows[..., R:], rows[:, 0, :R]
        norm = self.kv_a_layernorm
        # one launch for the rotations, the latent norm and (a few tokens) q_nope @ W_UK into q_full's latent slice
        apply_rope_qk(q[..., dn:], kv[:, :, None, R:], *rope, interleaved=self.rope_interleaved,
                      q_out=q_full[..., R:], k_out=k_out, out_slots=slots,
                      norm=(kv[..., :R], norm.weight, norm.eps, latent_out),
                      absorb=(q[..., :dn], w_kv[:, :dn], q_full[..., :R]))
        # (B, L, H, dv): each head's latent output times its W_UV (H, dv, R)
        o = cache.attention(q_full, positions, self.softmax_scale, row, v_dim=R, v_proj=w_kv[:, dn:])
        return self.o_proj(o.reshape(B, L, H * dv))
