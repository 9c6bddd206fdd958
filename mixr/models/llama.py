"""Grouped-query-attention decoders: dense Llama / Qwen2 / Qwen3 and the MoE Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE.

They differ only in options: attention biases, Q/K norms, which layers are sparse, router normalisation,
and Qwen2-MoE's gated shared expert.
"""

from dataclasses import dataclass, field

from mixr.layers.attention import Attention
from mixr.layers.mlp import GatedMLP
from mixr.layers.moe import MoE, RouterOptions
from mixr.layers.rotary import RotaryEmbedding, rope_parameters
from mixr.models.base import CausalLM, DecoderLayer

MOE_TYPES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")
DENSE_TYPES = ("llama", "qwen2", "qwen3")


@dataclass
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    mlp_bias: bool = False
    clip_qkv: float | None = None
    rope_parameters: dict = field(default_factory=dict)
    # moe
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        kind = hf["model_type"]
        kw = {k: hf[k] for k in cls.__dataclass_fields__ if hf.get(k) is not None}
        kw["rope_parameters"] = rope_parameters(hf)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: only silu is implemented")
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or []):
            raise ValueError("sliding-window attention is not supported (use_sliding_window / layer_types)")
        if kind in MOE_TYPES:
            # transformers 5 writes num_local_experts for every MoE family; publishers use num_experts.
            kw["num_experts"] = hf.get("num_experts") or hf.get("num_local_experts")
        if kind in ("mixtral", "olmoe"):
            kw["moe_intermediate_size"] = hf["intermediate_size"]  # their experts are the only FFN
        if kind == "mixtral":
            kw["norm_topk_prob"] = True
        # Q/K/V biases: always on in Qwen2, `qkv_bias` (default on) in Qwen2-MoE, `attention_bias` elsewhere.
        kw["qkv_bias"] = {"qwen2": True, "qwen2_moe": hf.get("qkv_bias", True)}.get(kind, kw.get("attention_bias", False))
        return cls(**kw)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    def cache_shapes(self) -> list[tuple[int, ...]]:
        """Per-token, per-layer cached tensors: K and V."""
        return [(self.num_key_value_heads, self.head_dim)] * 2

    def build(self) -> CausalLM:
        qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(self.model_type)
        o_bias = self.attention_bias and self.model_type in ("llama", "qwen3", "qwen3_moe", "olmoe")
        router = None
        if self.num_experts:
            router = RouterOptions(num_experts=self.num_experts, top_k=self.num_experts_per_tok,
                                   norm_topk_prob=self.norm_topk_prob)
        layers = []
        for i in range(self.num_hidden_layers):
            attn = Attention(self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim,
                             qkv_bias=self.qkv_bias, o_bias=o_bias, qk_norm=qk_norm, clip_qkv=self.clip_qkv,
                             rms_norm_eps=self.rms_norm_eps)
            if self.is_moe_layer(i):
                mlp = MoE(self.hidden_size, self.moe_intermediate_size, router,
                          shared_intermediate_size=self.shared_expert_intermediate_size,
                          shared_gate=self.model_type == "qwen2_moe")
            else:
                mlp = GatedMLP(self.hidden_size, self.intermediate_size, bias=self.mlp_bias)
            layers.append(DecoderLayer(attn, mlp, self.hidden_size, self.rms_norm_eps))
        rotary = RotaryEmbedding(self.head_dim, self.rope_parameters, self.max_position_embeddings)
        return CausalLM(self, layers, rotary)
