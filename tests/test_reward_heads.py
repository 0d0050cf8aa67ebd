"""Reward-head scoring with a private trunk LoRA: added by hooks on the scoring thread only,
the same scores as with the LoRA attached by peft, and never waiting for a job."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from hogwild.contracts.protocol import HeadScoresOp
from hogwild.training.btrm import RewardHeads
from hogwild.training.lora import attached_lora, load_factors, lora_factors
from hogwild.worker.model_access import ModelAccess
from hogwild.worker.reward_heads import TRUNK_LORA_ALPHA, TRUNK_LORA_R, HeadBook

TOKENS = [5, 17, 23, 9, 41, 8, 77, 3]
OP = HeadScoresOp(token_ids=TOKENS, positions=[2, 7])


def _model(tiny_model_dir, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()


def _book(model, seed: int = 0) -> HeadBook:
    """Heads with a trained-looking trunk LoRA (B is not zero) on every decoder layer."""
    torch.manual_seed(seed)
    with attached_lora(model, r=TRUNK_LORA_R, alpha=TRUNK_LORA_ALPHA, dropout=0.0) as peft_model:
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.1)
        factors = lora_factors(peft_model)
    heads = RewardHeads(model.config.hidden_size, ["a", "b", "c"])
    torch.nn.init.normal_(heads.proj.weight)
    book = HeadBook()
    book.replace(heads, {"trunk_lora": {"r": TRUNK_LORA_R, "alpha": TRUNK_LORA_ALPHA}}, factors)
    return book


def _peft_scores(access: ModelAccess, book: HeadBook) -> list[list[float]]:
    """What scoring did before: the trunk LoRA attached with peft, the model held exclusively."""
    with access.exclusive(), torch.no_grad(), \
            access.adapter(r=TRUNK_LORA_R, alpha=TRUNK_LORA_ALPHA, dropout=0.0) as peft_model:
        load_factors(peft_model, book.trunk_lora)
        hidden = access.model.base_model(input_ids=torch.tensor([OP.token_ids]), use_cache=False).last_hidden_state[0]
        return book.heads(hidden[torch.tensor(OP.positions)].float()).tolist()


def _close(a, b, tol: float = 1e-5) -> bool:
    return bool(torch.allclose(torch.tensor(a), torch.tensor(b), rtol=0, atol=tol))


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hooked_scores_equal_the_peft_attached_ones(tiny_model_dir, tmp_path, dtype):
    model = _model(tiny_model_dir, dtype)
    access = ModelAccess(model)
    book = _book(model)
    # peft's module names (base_model.model.model.layers...) map onto the plain model's.
    assert all(name.startswith("model.layers.") for name in book.trunk_lora)
    expected = _peft_scores(access, book)
    hooked = book.scores(access, OP).scores
    assert _close(hooked, expected), (hooked, expected)
    assert _hooks(model) == len(book.trunk_lora) == 14
    plain = HeadBook()
    plain.replace(book.heads, {}, None)
    assert not _close(plain.scores(access, OP).scores, expected, 1e-3)  # the LoRA changes the scores

    # Saved and restored (factors on the CPU, from bytes): the same scores.
    saved = tmp_path / ".hogwild"
    saved.mkdir()
    for name, data in book.files().items():
        (saved / name).write_bytes(data)
    restored = HeadBook()
    assert restored.restore(saved) == {"heads": ["a", "b", "c"]}
    assert _close(restored.scores(access, OP).scores, expected)


def test_a_forward_on_another_thread_meanwhile_sees_no_lora(tiny_model_dir):
    model = _model(tiny_model_dir)
    access = ModelAccess(model)
    book = _book(model)
    with torch.no_grad():
        baseline = model(torch.tensor([TOKENS])).logits
    expected = _peft_scores(access, book)
    scorer, seen = threading.get_ident(), []

    def job_forward():  # a training job's forward, in the middle of the scoring forward
        with torch.no_grad():
            seen.append(model(torch.tensor([TOKENS])).logits)

    def midway(module, args, out):
        if threading.get_ident() == scorer and not seen:
            other = threading.Thread(target=job_forward)
            other.start()
            other.join(30)

    handle = model.model.layers[1].register_forward_hook(midway)
    try:
        assert _close(book.scores(access, OP).scores, expected)
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], baseline)
    with torch.no_grad():  # and after it, on this thread too: the hooks stay, inert
        assert torch.equal(model(torch.tensor([TOKENS])).logits, baseline)


def test_scoring_with_a_trunk_lora_does_not_wait_for_a_job(tiny_model_dir):
    model = _model(tiny_model_dir)
    access = ModelAccess(model)
    book = _book(model)
    expected = book.scores(access, OP).scores
    answers = []
    with access.exclusive():  # a job holds the model
        scoring = threading.Thread(target=lambda: answers.append(book.scores(access, OP).scores))
        scoring.start()
        scoring.join(10)
        assert answers == [expected], "head scoring with a trunk LoRA queued behind the job"
    # Heads without a trunk LoRA take the hooks off again.
    book.replace(book.heads, {}, None)
    book.scores(access, OP)
    assert _hooks(model) == 0


def test_batched_last_token_scores_equal_one_at_a_time(tiny_model_dir):
    """RL's reward_heads scores a job's completions in padded batches: padding after a sequence
    does not change its last token's scores (fp32, trunk LoRA on)."""
    model = _model(tiny_model_dir)
    access, book = ModelAccess(model), _book(model)
    sequences = [TOKENS[:n] for n in (3, 8, 5, 1, 7)]
    batched = book.score_last_tokens(access, sequences, ["c", "a"], batch=4)
    for ids, got in zip(sequences, batched):
        alone = book.scores(access, HeadScoresOp(token_ids=ids, positions=[len(ids) - 1], heads=["c", "a"]))
        assert list(got) == ["c", "a"] and _close([list(got.values())], alone.scores), (ids, got, alone.scores)
