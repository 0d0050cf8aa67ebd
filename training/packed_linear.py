"""A frozen linear layer kept in a quantized checkpoint's packed form (compressed-tensors
``pack-quantized``: int4/int8 values packed into int32, with per-group scales), for training
adapters on a quantized base.

vLLM repacks such weights into its kernels' blocked layouts, so the trainer cannot view what
vLLM computes with; it keeps the checkpoint's packed tensors instead (a quarter of the bf16
size for int4) and dequantizes them with compressed-tensors' own ``decompress`` at each use,
never keeping the dense weight: forward and backward each dequantize (``_DequantizingLinear``),
so peak memory holds one layer's dense weight, not the model's. The dequantized weight is the
one vLLM's kernels compute with ((q - zero point) x scale, in the scales' dtype); the products
differ only in accumulation order and rounding (the parity gate bounds them).
"""

from __future__ import annotations

import torch


def packed_scheme(quantization_config: dict):
    """The one weight-only scheme of a compressed-tensors ``pack-quantized`` config, or
    ValueError saying what this trainer does not read."""
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig.model_validate({k: v for k, v in quantization_config.items() if k != "quant_method"})
    if config.format != "pack-quantized":
        raise ValueError(f"the trainer reads compressed-tensors pack-quantized bases; this one is {config.format!r}")
    schemes = list(config.config_groups.values())
    if len(schemes) != 1 or schemes[0].input_activations is not None or schemes[0].weights is None:
        raise ValueError("the trainer reads one weight-only quantization scheme (e.g. W4A16); this config has "
                         f"{len(schemes)} group(s)" + (" with activation quantization" if schemes and
                                                       schemes[0].input_activations is not None else ""))
    return schemes[0]


class _DequantizingLinear(torch.autograd.Function):
    """``x @ W.T + b`` with ``W`` dequantized in forward and again in backward: only the input's
    gradient flows (the base is frozen), and the dense ``W`` is never saved for backward."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return torch.nn.functional.linear(x, layer.dequantized(), layer.bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(), None


class PackedLinear(torch.nn.Linear):
    """A ``torch.nn.Linear`` (so PEFT adapts it as one) with no dense weight: ``weight`` is None
    and the packed tensors are buffers named as in the checkpoint."""

    def __init__(self, in_features: int, out_features: int, packed: dict[str, torch.Tensor], scheme,
                 dtype: torch.dtype, bias: torch.Tensor | None = None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("weight", None)
        self.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None
        for name, tensor in packed.items():
            self.register_buffer(name, tensor)
        self.scheme, self.dtype = scheme, dtype

    @property
    def qweight(self) -> torch.Tensor:
        """What PEFT reads a quantized layer's device from (GPTQ's name; ``weight`` is None)."""
        return self.weight_packed

    def dequantized(self) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

        state = {name: buffer for name, buffer in self.named_buffers(recurse=False)}
        return PackedQuantizationCompressor.decompress(state, self.scheme)["weight"].to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizingLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.scheme.weights.num_bits} bits"
