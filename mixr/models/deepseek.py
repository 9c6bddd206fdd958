"""DeepSeek-V2 / V3: multi-head latent attention, dense first layers, fine-grained routed + shared experts."""

from dataclasses import dataclass, field

from mixr.layers.mla import MLAttention
from mixr.layers.mlp import GatedMLP
from mixr.layers.moe import MoE, RouterOptions
from mixr.layers.rotary import RotaryEmbedding, rope_parameters, yarn_softmax_scale
from mixr.models.base import CausalLM, DecoderLayer


@dataclass
class DeepseekConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # mla
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    rope_parameters: dict = field(default_factory=dict)
    # moe
    moe_intermediate_size: int = 1408
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    @classmethod
    def from_hf(cls, hf: dict) -> "DeepseekConfig":
        v3 = hf["model_type"] == "deepseek_v3"
        kw = {k: hf[k] for k in cls.__dataclass_fields__ if hf.get(k) is not None}
        kw["rope_parameters"] = rope_parameters(hf)
        # transformers 5 drops the keys that its V3 code hard-codes; the published V3 configs carry them.
        kw.setdefault("topk_method", "noaux_tc" if v3 else "greedy")
        kw.setdefault("scoring_func", "sigmoid" if v3 else "softmax")
        kw.setdefault("n_routed_experts", hf.get("num_local_experts") or hf.get("num_experts"))
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: only silu is implemented")
        return cls(**kw)

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def cache_shapes(self) -> list[tuple[int, ...]]:
        """Per-token, per-layer cached tensors: one row [compressed latent | shared rotary key]."""
        return [(1, self.kv_lora_rank + self.qk_rope_head_dim)]

    def build(self) -> CausalLM:
        rope = self.rope_parameters
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5 * yarn_softmax_scale(rope)
        router = None
        if self.n_routed_experts:
            router = RouterOptions(
                num_experts=self.n_routed_experts, top_k=self.num_experts_per_tok, scoring_func=self.scoring_func,
                topk_method=self.topk_method, n_group=self.n_group, topk_group=self.topk_group,
                norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
                correction_bias=self.topk_method == "noaux_tc")
        layers = []
        for i in range(self.num_hidden_layers):
            attn = MLAttention(self.hidden_size, self.num_attention_heads, self.q_lora_rank, self.kv_lora_rank,
                               self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim, scale,
                               self.attention_bias, rope_interleaved=self.model_type == "deepseek_v2"
                               or self.rope_interleave)
            if self.is_moe_layer(i):
                mlp = MoE(self.hidden_size, self.moe_intermediate_size, router,
                          shared_intermediate_size=self.moe_intermediate_size * (self.n_shared_experts or 0))
            else:
                mlp = GatedMLP(self.hidden_size, self.intermediate_size)
            layers.append(DecoderLayer(attn, mlp, self.hidden_size, self.rms_norm_eps))
        rotary = RotaryEmbedding(self.qk_rope_head_dim, rope, self.max_position_embeddings)
        return CausalLM(self, layers, rotary)
