"""Build a small random Qwen2-style model that `vllm serve` can load offline.

    python -m hogwild.tiny_model OUT [--dtype float32|bfloat16] [--preset tiny|bench] [--arch qwen2|llama]

The tokenizer is a byte-level BPE trained on the package's story corpus, with
ChatML special tokens and a chat template, so the folder is a complete Hugging
Face model directory: transformers and vLLM load it the same way they load a
downloaded model. The weights are random (seeded), so the model
says nothing meaningful until it is trained.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
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


def build(out: Path, dtype: str = "float32", preset: str = "tiny", seed: int = 0, arch: str = "qwen2") -> Path:
    """Write a complete HF model directory to `out` and return it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    shape = PRESETS[preset]
    tokenizer = train_tokenizer(shape.vocab_target)
    config = config_cls(
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
    torch.manual_seed(seed)
    model = model_cls(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    # Greedy by default; no sampling settings that would surprise a test.
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "hogwild_tiny_model.json").write_text(
        json.dumps({"arch": arch, "preset": preset, "dtype": dtype, "seed": seed, **asdict(shape)}, indent=2) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hogwild.tiny_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output model directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2", help="Qwen2 (default) or Llama family")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build(args.out, args.dtype, args.preset, args.seed, args.arch)
    print(f"wrote {args.preset} {args.arch} {args.dtype} model to {out}")


if __name__ == "__main__":
    main()
