"""Drop-in modules for quantized weights. Their buffers are named as the checkpoint keys:

  QuantLinear   <linear>.qweight / .scales / .zeros (zero-point int4 only) / .bias
  QuantExperts  mlp.experts.gate_up_proj.qweight / .scales / .zeros and mlp.experts.down_proj.*, stacked over
                the experts (E, ...) like the float `Experts`, not one tensor per expert
  Fp8Linear     <linear>.weight (float8_e4m3fn) / .weight_scale_inv (float32 blocks), DeepSeek-V3's own keys

They hold buffers, not parameters: quantized weights are for inference, not training.
"""


import torch
from torch import nn

from mixr.kernels.fp8 import fp8_block_linear
from mixr.kernels.fused_moe import fused_moe_quant
from mixr.kernels.quant_gemm import dequantize, quant_linear
from mixr.quant.fp8 import scale_shape
from mixr.quant.rtn import QuantSpec


class QuantWeight(nn.Module):
    """One packed weight (..., N, K): qweight, scales and, for zero-point int4, zeros."""

    def __init__(self, shape: tuple[int, ...], spec: QuantSpec, dtype: torch.dtype, device=None, name: str = "weight"):
        super().__init__()
        *lead, N, K = shape
        self.spec, self.shape = spec, tuple(shape)
        groups = spec.groups(K, name)
        qdtype = torch.int8 if spec.bits == 8 else torch.uint8
        self.register_buffer("qweight", torch.empty(*lead, N, spec.packed_k(K), dtype=qdtype, device=device))
        self.register_buffer("scales", torch.empty(*lead, N, groups, dtype=dtype, device=device))
        zeros = torch.empty(*lead, N, groups, dtype=torch.uint8, device=device) if spec.zero_point else None
        self.register_buffer("zeros", zeros)

    def set(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> None:
        self.qweight, self.scales = qweight, scales
        if self.spec.zero_point:
            self.zeros = zeros

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self.qweight, self.scales, self.zeros

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.spec.bits, dtype)

    def extra_repr(self) -> str:
        s = self.spec
        fmt = "int8 per-channel" if s.bits == 8 else f"int4 g{s.group_size}{' zero-point' if s.zero_point else ''}"
        return f"shape={self.shape}, {fmt}"


class QuantLinear(QuantWeight):
    """nn.Linear with a packed weight: y = x @ dequantize(W)^T + b, computed by `quant_linear` (on CUDA a kernel
    that dequantizes inside its K loop; elsewhere the reference)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec, dtype: torch.dtype,
                 device=None, name: str = "linear"):
        super().__init__((out_features, in_features), spec, dtype, device, name)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = quant_linear(x.reshape(-1, shape[-1]), self.qweight, self.scales, self.zeros, self.spec.bits, self.bias)
        return y.view(*shape[:-1], self.out_features)


class QuantExperts(nn.Module):
    """`Experts` with packed stacked weights: gate_up_proj (E, 2I, H), down_proj (E, H, I); same forward."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, spec: QuantSpec,
                 dtype: torch.dtype, device=None, name: str = "experts"):
        super().__init__()
        self.spec = spec
        self.gate_up_proj = QuantWeight((num_experts, 2 * intermediate_size, hidden_size), spec, dtype, device,
                                        f"{name}.gate_up_proj")
        self.down_proj = QuantWeight((num_experts, hidden_size, intermediate_size), spec, dtype, device,
                                     f"{name}.down_proj")

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared: tuple | None = None
                ) -> torch.Tensor:
        """x (T, H), ids/weights (T, k) -> (T, H); `shared`: a shared expert's packed weights to add (see
        `shared_operands`)."""
        return fused_moe_quant(x, self.gate_up_proj.packed(), self.down_proj.packed(), ids, weights, self.spec.bits,
                               shared=shared)

    def shared_operands(self, linears: tuple[nn.Module, nn.Module, nn.Module]) -> tuple | None:
        """A shared expert's packed (gate, up, down) for `forward(shared=...)`, or None unless they are bias-free
        QuantLinears in this module's format."""
        if not all(isinstance(m, QuantLinear) and m.bias is None and m.spec == self.spec for m in linears):
            return None
        return tuple(m.packed() for m in linears)


class Fp8Linear(nn.Module):
    """nn.Linear keeping DeepSeek-V3's FP8 weight and 128x128 block scales; forward runs
    `mixr.kernels.fp8.fp8_block_linear` (block-scaled FP8 GEMM on Hopper, its reference elsewhere)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None,
                 block: tuple[int, int] = (128, 128)):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale_inv", torch.empty(scale_shape((out_features, in_features), self.block),
                                                             dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = fp8_block_linear(x.reshape(-1, shape[-1]), self.weight, self.weight_scale_inv, self.block)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 blocks={self.block}"
