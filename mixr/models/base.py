"""The decoder stack every family shares: embeddings, pre-norm blocks, final norm, LM head."""

import torch
from torch import nn

from mixr.layers.norm import RMSNorm
from mixr.layers.rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x, residual, positions, rope, cache=None):
        """h = h + attn(norm(h)); h = h + mlp(norm(h)), with the stream h carried as two tensors so that each
        residual add runs inside the next norm's kernel (vLLM's fused_add_rms_norm): in, h = x + residual (residual
        None: h = x, the first layer); out, (mlp output, h before it is added). The values are unchanged."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, rope, cache)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Decoder(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, layers: list[DecoderLayer], eps: float,
                 rotary: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(hidden_size, eps)
        self.rotary_emb = rotary

    def forward(self, input_ids, positions, cache=None):
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, rope, None if cache is None else cache.layer(i))
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """A decoder-only language model. Module and parameter names are the Hugging Face checkpoint keys.

    forward supports autograd: training and inference share this module; the runner owns inference_mode.
    """

    def __init__(self, config, layers: list[DecoderLayer], rotary: RotaryEmbedding):
        super().__init__()
        self.config = config
        self.model = Decoder(config.vocab_size, config.hidden_size, layers, config.rms_norm_eps, rotary)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache=None) -> torch.Tensor:
        """input_ids (B, L) -> final hidden states (B, L, hidden). positions default to 0..L-1."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.model(input_ids, positions, cache)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, L, vocab)."""
        return self.lm_head(self.hidden_states(input_ids, positions, cache))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation for models built from a config rather than loaded."""
        for name, p in self.named_parameters():
            init_parameter_(name, p, std, generator)


def init_parameter_(name: str, p: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    """One parameter of init_weights (and of load_format="dummy"): norms 1, biases 0, the rest N(0, std)."""
    if name.endswith("norm.weight"):
        p.fill_(1.0)
    elif name.endswith(".bias"):
        p.zero_()
    else:
        p.normal_(0.0, std, generator=generator)
