"""Whether this server's weights can be trained in place: read from vLLM's config, in
every vLLM process (the API server answers 501 with the reason; the model worker keeps
vLLM's fast kernels where it publishes nothing)."""

from __future__ import annotations

from hogwild.contracts.served_adapter import quantized_base_refusal


# The quantization method whose checkpoints the trainer reads (``training/packed_linear.py``).
ADAPTER_TRAINABLE_QUANTIZATION = "compressed-tensors"


def quantization(vllm_config) -> str | None:
    """vLLM's name of the served base's quantization method, or None."""
    method = vllm_config.model_config.quantization
    if method is None and vllm_config.quant_config is not None:
        method = type(vllm_config.quant_config).__name__
    return str(method) if method is not None else None


def full_weight_refusal(vllm_config) -> str | None:
    """Why this server's base trains adapters only (a quantized base), or None."""
    method = quantization(vllm_config)
    return quantized_base_refusal(method) if method is not None else None


def unsupported_reason(vllm_config) -> str | None:
    """Why this server's weights cannot be trained in place, or None. Tensor parallel is
    supported: each vLLM rank publishes its shard and the trainer runs one rank per vLLM rank."""
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        return (f"training with pipeline parallel size {par.pipeline_parallel_size} is not supported (inference works); "
                "serve with pipeline parallel size 1 to train")
    if getattr(par, "data_parallel_size", 1) > 1:
        return "training with data parallel size > 1 is not supported yet (inference works)"
    method = quantization(vllm_config)
    if method is not None and par.tensor_parallel_size > 1:
        return (f"training on a quantized ({method}) base with tensor parallel size {par.tensor_parallel_size} is not "
                "supported: serve it with tensor parallel size 1 to train adapters on it")
    if method is not None and method != ADAPTER_TRAINABLE_QUANTIZATION:
        return (f"training on a {method} base is not supported: adapters train on compressed-tensors "
                "(pack-quantized, weight-only) bases")
    if vllm_config.device_config.device.type not in ("cpu", "cuda"):
        return f"training on {vllm_config.device_config.device.type} is not supported"
    return None
