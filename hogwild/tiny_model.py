"""Build a small random model of a decoder family that `vllm serve` can load offline.

    python -m hogwild.tiny_model OUT [--dtype float32|bfloat16] [--preset tiny|bench] [--arch NAME]

``--arch``: qwen2 (default), llama, qwen3, mistral, gemma2, gemma3, phi3, olmo2,
granite, qwen3_moe (MoE), qwen3_next (Gated DeltaNet + attention, MoE), qwen3_5
(Gated DeltaNet + attention), qwen3_5_vl (the same with a vision tower). Every family has head size 32 (what vLLM's CPU
attention accepts); the Gated DeltaNet ones have linear-attention heads of 64 and
must be served in bf16 on CPU (vLLM's CPU kernel for those layers runs in bf16
only: ``FAMILIES[arch].serve_dtype``). Apart from qwen2 and llama (kept as they
always were), every weight, norms included, gets a little noise after the
family's own initialisation, so that a mapping that swaps two tensors changes
what the model computes.

The tokenizer is a byte-level BPE trained on the package's story corpus, with
ChatML special tokens and a chat template, so the folder is a complete Hugging
Face model directory: transformers and vLLM load it the same way they load a
downloaded model. The weights are random (seeded), so the model
says nothing meaningful until it is trained.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as used by Qwen2 models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    """Architecture sizes of a built model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_target: int


# Head size is 32 in both presets: vLLM's CPU attention accepts 32, 64, 80, ...
PRESETS = {
    # Small enough for tests: every test server starts in ~35 s on 2 cores.
    "tiny": Shape(64, 256, 2, 2, 1, 2000),
    # ~24M parameters: compute-bound enough for benchmark ratios to mean something.
    "bench": Shape(512, 1536, 8, 16, 4, 4000),
}


def corpus_files() -> list[Path]:
    """The story corpus shipped with the package (stories/ in a checkout): hand-written
    English prose that changes only when a story does. (Training on the project's own source,
    as this once did, reshaped the tokenizer, and so every test's token ids, at each code edit.)"""
    from importlib.resources import files

    root = Path(str(files("hogwild.stories")))
    return sorted(root.rglob("*.txt"), key=lambda f: f.relative_to(root).as_posix())


def train_tokenizer(vocab_target: int):
    """Train a byte-level BPE on the story corpus; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f.read_text(encoding="utf-8", errors="replace") for f in corpus_files()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
    )


@dataclass(frozen=True)
class Family:
    """A decoder family: transformers' config and model class, and what differs from the common shape."""

    config: str
    model: str
    kind: str  # dense | moe | hybrid | hybrid+moe
    extra: dict = field(default_factory=dict)
    serve_dtype: str | None = None  # the dtype vLLM's CPU backend needs, when it needs one
    perturb: bool = True
    vision: dict | None = None  # a vision-language model: its vision tower's config (the text config is the family's)
    trains: str | None = None  # the transformers class that trains, when not ``model`` (a VL model's language model)
    serve_args: tuple[str, ...] = ()  # what `vllm serve` needs besides


VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1, norm_topk_prob=True)
# vLLM's CPU Gated DeltaNet kernel takes linear-attention heads of 64 or 128, in bf16.
_GATED_DELTANET = dict(linear_conv_kernel_dim=4,
                       linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=1, linear_num_value_heads=2)
_GEMMA = dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=64, tie_word_embeddings=True)

FAMILIES = {
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", "dense", perturb=False),
    "llama": Family("LlamaConfig", "LlamaForCausalLM", "dense", perturb=False),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", "dense", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": Family("MistralConfig", "MistralForCausalLM", "dense", dict(head_dim=32, sliding_window=None)),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", "dense", _GEMMA),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM", "dense", _GEMMA),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", "dense"),
    "olmo2": Family("Olmo2Config", "Olmo2ForCausalLM", "dense"),
    "granite": Family("GraniteConfig", "GraniteForCausalLM", "dense",
                      dict(tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=8.0,
                           residual_multiplier=0.22, attention_multiplier=1 / 32)),
    "qwen3_moe": Family("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "moe", dict(head_dim=32, **_MOE)),
    "qwen3_next": Family("Qwen3NextConfig", "Qwen3NextForCausalLM", "hybrid+moe",
                         dict(head_dim=32, shared_expert_intermediate_size=64, **_MOE, **_GATED_DELTANET),
                         serve_dtype="bfloat16"),
    "qwen3_5": Family("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", "hybrid", dict(head_dim=32, **_GATED_DELTANET),
                      serve_dtype="bfloat16"),
    # The public Qwen3.5-27B is this class. Served text-only here: vLLM cannot build its
    # image processor without torchvision, which this CPU stack lacks (DESIGN.md).
    "qwen3_5_vl": Family("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "hybrid, vision-language",
                         dict(head_dim=32, **_GATED_DELTANET,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                               "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
                         serve_dtype="bfloat16", serve_args=("--language-model-only",), trains="Qwen3_5ForCausalLM",
                         vision=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3,
                                     patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                                     num_position_embeddings=256)),
}


def build(out: Path, dtype: str = "float32", preset: str = "tiny", seed: int = 0, arch: str = "qwen2",
          quantize: str | None = None) -> Path:
    """Write a complete HF model directory to `out` and return it; ``quantize="w4a16"``: its
    decoder's linear layers quantized (``quantize_w4a16``)."""
    import torch
    import transformers
    from transformers import GenerationConfig

    family = FAMILIES[arch]
    shape = PRESETS[preset]
    tokenizer = train_tokenizer(shape.vocab_target)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    if "linear_conv_kernel_dim" in family.extra:  # Gated DeltaNet: every 4th layer full attention, as Qwen3.5 has it
        every = min(4, shape.num_hidden_layers)
        common["layer_types"] = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                                 for i in range(shape.num_hidden_layers)]
    if family.vision is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *VISION_TOKENS]})
        common["vocab_size"] = len(tokenizer)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
        config = getattr(transformers, family.config)(
            text_config={**common, **family.extra}, vision_config=family.vision, tie_word_embeddings=False,
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    else:
        config = getattr(transformers, family.config)(**{**common, **family.extra})
    config.architectures = [family.model]
    torch.manual_seed(seed)
    model = getattr(transformers, family.model)(config)
    if family.perturb:
        noise = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=noise) * 0.02)
    model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if quantize:
        if family.kind != "dense":
            raise SystemExit(f"--quantize: only dense families are quantized here, not {arch} ({family.kind})")
        quantize_w4a16(model, out)
    # Greedy by default; no sampling settings that would surprise a test.
    GenerationConfig(eos_token_id=common["eos_token_id"], pad_token_id=common["pad_token_id"]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if family.vision is not None:
        write_image_processor(out, family.vision)
    (out / "hogwild_tiny_model.json").write_text(
        json.dumps({"arch": arch, "kind": family.kind, "serve_dtype": family.serve_dtype, "preset": preset, "dtype": dtype,
                    "seed": seed, "quantize": quantize, **asdict(shape)}, indent=2) + "\n"
    )
    return out


def quantize_w4a16(model, out: Path, group_size: int = 32) -> None:
    """Rewrite the decoder's linear layers in ``out`` as compressed-tensors W4A16: int4 weights,
    symmetric, one scale per ``group_size`` inputs (min-max, no calibration data), packed
    (``pack-quantized``): a format vLLM serves on CPU (its CPUWNA16 kernel) as on GPU. The
    embeddings, norms and head stay in the model's dtype."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from safetensors.torch import load_file, save_file

    from hogwild.training.hf_model import decoder_layers

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    names = {id(m): n for n, m in model.named_modules()}
    path = out / "model.safetensors"
    tensors = load_file(path)
    for layer in decoder_layers(model):
        for module in layer.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            name = names[id(module)]
            weight = tensors.pop(f"{name}.weight")
            groups = weight.float().view(weight.shape[0], -1, group_size)
            scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            packed = PackedQuantizationCompressor.compress(
                {"weight": weight, "weight_scale": scale.to(weight.dtype), "weight_zero_point": zero_point}, scheme)
            tensors.update({f"{name}.{key}": value.contiguous() for key, value in packed.items()})
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    quantization = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                      quantization_status="compressed", ignore=["lm_head"])
    config["quantization_config"] = {"quant_method": "compressed-tensors", **quantization.model_dump(mode="json")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_image_processor(out: Path, vision: dict) -> None:
    """Qwen-VL preprocessor configs, written by hand: saving transformers' processor needs
    its video processor, which needs torchvision."""
    image = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor", "do_resize": True,
             "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
             "image_std": [0.5] * 3, "do_convert_rgb": True, "patch_size": vision["patch_size"],
             "temporal_patch_size": vision["temporal_patch_size"], "merge_size": vision["spatial_merge_size"],
             "size": {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}}
    video = {k: v for k, v in image.items() if k != "image_processor_type"} | {
        "video_processor_type": "Qwen3VLVideoProcessor", "fps": 2, "min_frames": 4, "max_frames": 16}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hogwild.tiny_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output model directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--arch", choices=list(FAMILIES), default="qwen2", help="the decoder family (default: qwen2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", choices=["w4a16"], default=None,
                        help="quantize the decoder's linear layers (compressed-tensors int4, group 32)")
    args = parser.parse_args(argv)
    out = build(args.out, args.dtype, args.preset, args.seed, args.arch, args.quantize)
    print(f"wrote {args.preset} {args.arch} {args.dtype} model to {out}" + (f", {args.quantize}" if args.quantize else ""))


if __name__ == "__main__":
    main()
