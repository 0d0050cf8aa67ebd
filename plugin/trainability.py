"""Whether this server's weights can be trained in place: read from vLLM's config, in
every vLLM process (the API server answers 501 with the reason; the model worker keeps
vLLM's fast kernels where it publishes nothing)."""

from __future__ import annotations


def unsupported_reason(vllm_config) -> str | None:
    """Why this server's weights cannot be trained in place, or None. Tensor parallel is
    supported: each vLLM rank publishes its shard and the trainer runs one rank per vLLM rank."""
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        return (f"training with pipeline parallel size {par.pipeline_parallel_size} is not supported (inference works); "
                "serve with pipeline parallel size 1 to train")
    if getattr(par, "data_parallel_size", 1) > 1:
        return "training with data parallel size > 1 is not supported yet (inference works)"
    if vllm_config.quant_config is not None or vllm_config.model_config.quantization:
        return f"training a quantized model ({vllm_config.model_config.quantization}) is not supported"
    if vllm_config.device_config.device.type not in ("cpu", "cuda"):
        return f"training on {vllm_config.device_config.device.type} is not supported"
    return None
