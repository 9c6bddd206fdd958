import torch
from torch import nn

from mixr.kernels.norm import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(x); or, given the residual stream, (RMSNorm(x + residual), x + residual) in one kernel.

        Normalises in float32 and casts back before the weight multiply, as the HF reference does: bf16
        checkpoints were trained with exactly this rounding (mixr.kernels.norm keeps it on every path).
        """
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)
