"""The transformers model that trains a served model: which class, built without memory.

Both vLLM's worker (to derive which of its tensors each parameter is a view of)
and the trainer (to bind them) build it here, so they agree on every name. A
vision-language checkpoint trains its language model: the class is the text
model's causal LM, built from the text config (transformers' own conversion
maps the checkpoint's ``language_model`` names onto it); the vision tower is
neither built nor trained.
"""

from __future__ import annotations

from pathlib import Path

import torch


class UnsupportedModel(RuntimeError):
    """The served model cannot be trained; the message says why."""


def training_config(model_dir: str | Path):
    """The config of the model that trains: the text config of a vision-language model."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(f"{config.model_type} is an encoder-decoder model: only decoder-only models train")
    text = config.get_text_config()
    return text if text is not config else config


def is_vision_language(model_dir: str | Path) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    return config.get_text_config() is not config


def attention_for(config) -> dict:
    """transformers' attention setting that computes what vLLM does: its SDPA path skips
    Gemma 2's attention-logit soft-capping (vLLM applies it), so that one runs eager."""
    return {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}


def skeleton(model_dir: str | Path, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM for ``model_dir`` with its parameters on the meta device (no
    memory), real buffers (rotary tables) and tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = training_config(model_dir)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention_for(config))
    except ValueError as exc:  # no causal LM class for this config
        raise UnsupportedModel(f"transformers has no causal LM for {type(config).__name__}: {exc}") from None
    model.tie_weights()  # not done under init_empty_weights
    if is_vision_language(model_dir):
        # The checkpoint holds the language model under a prefix (``model.language_model.*``).
        # transformers' save-side conversion restores it only for a model it loaded itself.
        from transformers.conversion_mapping import get_model_conversion_mapping

        model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder layers (``model.layers`` of its base model, through a peft wrapper too)."""
    inner = model
    while not hasattr(inner, "layers"):
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner.model
    return inner.layers


def pad_token_id(config) -> int:
    """The id batches are padded with: the config's pad token if it is one, else 0."""
    pad, vocab = getattr(config, "pad_token_id", None), int(config.vocab_size)
    return int(pad) if isinstance(pad, int) and 0 <= pad < vocab else 0
