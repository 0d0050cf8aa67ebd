"""Circuit-breaker LoRA: loss masks from chat templates, the sampler, exact
merge and revert, and real training on the tiny model (a run that reroutes,
and an over-aggressive one that trips and is rolled back)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hogwild.contracts.circuit_breaker_config import CBConfig
from hogwild.training.chat_masks import assistant_markers, loss_mask
from hogwild.training.circuit_breaker import CircuitBreakerTrainer, StratifiedSampler, clamp_layers, judge_coherence
from hogwild.training.circuit_breaker_data import conversation, read_jsonl, synthetic_samples, write_jsonl
from hogwild.training.lora import attached_lora, lora_factors, merge_in_place, revert_in_place

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _masked_text(tok, ids, mask) -> str:
    return tok.decode([t for t, keep in zip(ids, mask) if keep])


def test_assistant_spans_from_a_chatml_template(tokenizer):
    markers = assistant_markers(tokenizer)
    ids = tokenizer.apply_chat_template([
        {"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}], tokenize=True)
    ids = list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)
    mask, found = loss_mask(ids, markers, "assistant")
    text = _masked_text(tokenizer, ids, mask)
    assert found and "first answer<|im_end|>" in text and "second answer<|im_end|>" in text
    assert "question" not in text and "assistant" not in text and "user" not in text
    assert loss_mask(ids, markers, "all") == ([True] * len(ids), True)


def test_assistant_spans_from_a_llama3_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    markers = assistant_markers(tok)
    assert markers is not None and tok.decode(markers.end) == "<|eot_id|>"
    ids = conversation(tok, "how are you", "fine thanks")
    mask, found = loss_mask(ids, markers, "assistant")
    assert found and _masked_text(tok, ids, mask).strip() == "fine thanks<|eot_id|>"


def test_no_assistant_span_falls_back_to_the_whole_sequence_and_says_so(tokenizer):
    ids = tokenizer.encode("plain text with no chat turns at all", add_special_tokens=False)
    assert loss_mask(ids, assistant_markers(tokenizer), "assistant") == ([True] * len(ids), False)
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    assert assistant_markers(tok) is None


def test_stratified_sampler_visits_every_class():
    classes = ["common"] * 20 + ["rare"] * 2
    sampler = StratifiedSampler(list(range(22)), classes, seed=0)
    drawn = [i for _ in range(5) for i in sampler.batch(4)]
    assert sum(i >= 20 for i in drawn) == 10  # half of every batch comes from the rare class
    assert clamp_layers([15], 2) == [1] and clamp_layers([-3, 0, 40], 4) == [0, 3]


def test_jsonl_reader_reports_bad_rows(tmp_path, tokenizer):
    path = write_jsonl(synthetic_samples(tokenizer, 2, 2), tmp_path / "cb.jsonl")
    with open(path, "a") as f:
        f.write('{"ids": [1, 2], "split": "sideways"}\nnot json\n')
    samples, report = read_jsonl(path)
    assert len(samples) == 4 and report["bad_rows"] == 2 and [b["line"] for b in report["bad"]] == [5, 6]


def test_attaching_a_lora_leaves_the_model_as_it_was(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    with attached_lora(model, layers=[0, 1]) as peft_model:
        assert any("lora_A" in n for n, _ in peft_model.named_parameters())
        assert not params["model.layers.0.self_attn.q_proj.weight"].requires_grad
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] and params[n].requires_grad for n in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_revert_are_exact(tiny_model_dir, dtype):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with attached_lora(model, layers=[0, 1]) as peft_model:
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # a non-zero adapter of realistic size
                torch.nn.init.normal_(p, std=0.3)
        factors = lora_factors(peft_model)
    assert len(factors) == 14
    record = merge_in_place(model, factors)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, original[n])]
    assert len(changed) == 14
    # The naive subtraction would not have been exact (bf16: stochastic rounding of the merge too).
    naive = [n for n, (a, b, s) in factors.items()
             if not torch.equal((model.get_submodule(n).weight.float() - s * b.float() @ a.float()).to(dtype),
                                original[f"{n}.weight"])]
    assert naive and record.kept_bytes() > 0
    assert revert_in_place(model, record)
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    # Trained after the merge: the revert subtracts the delta and says it was not exact.
    record = merge_in_place(model, factors)
    with torch.no_grad():
        model.get_submodule("model.layers.0.self_attn.q_proj").weight.add_(1e-3)
    assert not revert_in_place(model, record)


@pytest.fixture(scope="module")
def cb_samples(tokenizer):
    return synthetic_samples(tokenizer, 16, 16)


def test_training_reroutes_harmful_and_keeps_retain(tiny_model_dir, tokenizer, cb_samples):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = CBConfig(lr=5e-4, steps=80)  # default alpha 0.5, target layer [15] -> clamped to the last layer
    result, factors = CircuitBreakerTrainer(model, tokenizer, config).run(cb_samples)
    assert result.target_layers == [1] and result.lora_layers == [0, 1]
    assert result.tripped is None and result.steps == 80
    assert result.harmful_cos_before > 0.99 and result.harmful_cos_after < 0.2
    assert result.retain_l2_relative_after < 0.25 and result.retain_cos_after > 0.95
    assert result.coherence["passed"], result.coherence
    assert result.mask["masked_token_fraction"] < 0.8 and result.mask["samples_without_assistant_span"] == 0
    assert factors is not None and len(factors) == 14
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # training alone changes nothing
    diag = result.diagnostics[-1]
    assert {"lambda_eff", "rho", "harmful_cos", "retain_cos", "skipped_bad_signs", "rescaled", "grad_norm"} <= diag.keys()


def test_an_over_aggressive_run_trips_and_is_rolled_back(tiny_model_dir, tokenizer, cb_samples):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    config = CBConfig(alpha_max=10, guards=False, lr=5e-4, steps=80)
    result, factors = CircuitBreakerTrainer(model, tokenizer, config).run(cb_samples)
    assert result.tripped and "validation metric fell" in result.tripped
    assert result.rolled_back_to_step is not None and result.rolled_back_to_step < 80
    assert factors is None and not result.mergeable
    # What is left after the rollback is the last good state, not the collapsed one.
    assert result.retain_cos_after > 0.75


def test_coherence_blames_the_adapter_only_for_what_it_changes():
    plain = "the cat sat on a mat and then it slept"
    looping = "and so so so so so so on"  # "so" 6 times in a row: the limit (max_word_run 6) is 5
    # The base model already repeats 6 times on the first prompt: the adapter, doing the same there, passes.
    same = judge_coherence([looping, plain], [looping, plain], max_word_run=6, min_vocab_ratio=0.5)
    assert same["passed"], same
    assert same["longest_word_run"] == same["longest_word_run_original"] == 6
    # A longer run than the base's own there is the adapter's doing.
    longer = judge_coherence(["so " * 7, plain], [looping, plain], max_word_run=6, min_vocab_ratio=0.5)
    assert not longer["passed"] and "prompt 0: a word repeats 7 times in a row (limit 5; 6 without the adapter)" in longer["reasons"]
    # Where the base does not loop, a run at the limit fails, even if the base loops on another prompt.
    elsewhere = judge_coherence([looping, looping], [looping, plain], max_word_run=6, min_vocab_ratio=0.0)
    assert elsewhere["reasons"] == ["prompt 1: a word repeats 6 times in a row (limit 5; 1 without the adapter)"]
    assert not elsewhere["passed"]
    # Runs below the limit pass; a collapsed vocabulary does not.
    assert judge_coherence(["so so so so so on"], [plain], max_word_run=6, min_vocab_ratio=0.0)["passed"]
    poor = judge_coherence(["cat cat dog cat dog"], [plain], max_word_run=6, min_vocab_ratio=0.5)
    assert not poor["passed"] and "2 distinct words against 10 without the adapter" in poor["reasons"][0]
