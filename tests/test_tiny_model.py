"""The embedded default model builder."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def test_tiny_model_is_a_complete_hf_directory(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert config.hidden_size // config.num_attention_heads == 32  # vLLM's CPU attention needs 32, 64, ...
    assert config.vocab_size % 64 != 0  # so vLLM pads the vocabulary, and the padding path is exercised
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok) == config.vocab_size
    text = "def train(model): return model  # HOGWILD"
    assert tok.decode(tok.encode(text)) == text  # byte-level: lossless
    assert len(tok.encode("the model")) < len("the model")  # merges learned from this repo's text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.dtype == torch.float32


def test_cli_writes_bf16_and_llama_variants(tmp_path):
    out = tmp_path / "bf16-llama"
    subprocess.run([sys.executable, "-m", "hogwild.tiny_model", str(out), "--dtype", "bfloat16", "--arch", "llama"], check=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
