"""Reward heads (BTRM): the loss worked by hand, the data, and real training."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hogwild.contracts.btrm_config import BTRMConfig, SourceSpec, effective_negatives_per_head, load_config
from hogwild.training.btrm import RewardHeads, btrm_loss, last_token_features, logsq_penalty, soft_cap
from hogwild.training.btrm_corpora import write_corpora
from hogwild.training.btrm_data import build_labelled_set, decode_source
from hogwild.training.btrm_run import encode, train_on_features


def test_the_log_square_penalty_by_hand():
    r = torch.tensor([1.0, 0.1, 10.0])
    squared = logsq_penalty(r, "squared")
    assert squared[0].item() == pytest.approx(0.0, abs=1e-5)
    assert squared[1].item() == pytest.approx(21.2, abs=0.05) and squared[2].item() == pytest.approx(21.2, abs=0.05)
    assert squared[1].item() == pytest.approx(math.log(0.01 + 1e-6) ** 2, rel=1e-5)
    literal = logsq_penalty(r, "literal")
    assert literal[1].item() == pytest.approx(-4.6, abs=0.01) and literal[2].item() == pytest.approx(4.6, abs=0.01)
    # The literal form keeps falling towards r = 0: it rewards small positives.
    assert logsq_penalty(torch.tensor(0.01), "literal") < logsq_penalty(torch.tensor(0.1), "literal")
    # Below 0 the squared form has no second minimum: it is continuous at 0 and rises away from it,
    # so its gradient pushes every negative positive up (the even form would settle it at -1).
    below = torch.tensor([-1.0, -0.5, -1e-4], requires_grad=True)
    logsq_penalty(below).sum().backward()
    assert (below.grad < 0).all()
    assert logsq_penalty(torch.tensor(-1.0)) > logsq_penalty(torch.tensor(-0.5)) > logsq_penalty(torch.tensor(1e-4))
    assert logsq_penalty(torch.tensor(0.0)).item() == pytest.approx(math.log(1e-6) ** 2)


def test_heads_without_positives_in_the_batch_do_not_count():
    scores = torch.tensor([[2.0, 5.0], [0.0, -1.0]])
    positive = torch.tensor([[True, False], [False, False]])  # head 1 has no positive here
    negative_weight = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    out = btrm_loss(scores, positive, negative_weight, lam=0.0)
    assert out.active.tolist() == [True, False]
    # Only head 0: one pair (2.0 vs 0.0) of weight 1.
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-6)
    assert out.bt[1].item() == 0.0


def test_tier_weights_scale_their_pairs():
    # One positive (r=1) against a soft negative (r=0, weight 2) and a furthest one (r=3, weight 0.5).
    scores = torch.tensor([[1.0], [0.0], [3.0]])
    positive = torch.tensor([[True], [False], [False]])
    negative_weight = torch.tensor([[0.0], [2.0], [0.5]])
    out = btrm_loss(scores, positive, negative_weight, lam=0.5)
    bt = (2.0 * math.log1p(math.exp(-1.0)) + 0.5 * math.log1p(math.exp(2.0))) / 2.5
    reg = math.log(1.0 + 1e-6) ** 2
    assert out.loss.item() == pytest.approx(bt + 0.5 * reg, rel=1e-6)


def test_the_cap_bounds_scores():
    heads = RewardHeads(8, ["a", "b"], cap=10.0)
    with torch.no_grad():
        heads.proj.weight.fill_(100.0)
    scores = heads(torch.randn(16, 8) * 100)
    assert scores.abs().max() <= 10.0
    assert soft_cap(torch.tensor([1e6]), 0).item() == 1e6  # 0 disables
    assert soft_cap(torch.tensor([1.0]), 10.0).item() == pytest.approx(10 * math.tanh(0.1))


def test_heads_survive_a_round_trip_through_bytes():
    heads = RewardHeads(8, ["a", "b"], cap=5.0)
    with torch.no_grad():
        heads.proj.weight.normal_()
    again = RewardHeads.from_bytes(*heads.to_bytes({"note": 1}))
    x = torch.randn(3, 8)
    assert torch.equal(heads(x), again(x)) and again.names == ["a", "b"] and again.extra == {"note": 1}


def test_decoders_filter_tiers_find_the_text_and_report_bad_rows(tmp_path):
    rows = [
        {"id": "1", "tier": "flattened", "text": "flat words", "prose": "ignored"},
        {"id": "2", "tier": "fk_normed", "prose": "Plain prose."},
        {"id": "3", "tier": "brainrot_aesop_v7", "prose": "A fable."},
        {"id": "4", "tier": "other", "body": "first string field"},
        {"id": "5", "tier": "flattened", "text": ""},
    ]
    path = tmp_path / "src.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n[1, 2]\nnot json\n")
    everything = decode_source(SourceSpec(path="src.jsonl"), tmp_path)
    assert everything.texts == ["flat words", "Plain prose.", "A fable.", "first string field"]
    assert everything.rows == 7 and [line for line, _ in everything.bad] == [5, 6, 7]
    assert "no text" in everything.bad[0][1] and "not a JSON object" in everything.bad[1][1] and "not JSON" in everything.bad[2][1]
    only = decode_source(SourceSpec(path="src.jsonl", tier_filter=["fk_normed", "other"]), tmp_path)
    assert only.texts == ["Plain prose.", "first string field"] and only.filtered_out == 3
    named = decode_source(SourceSpec(path="src.jsonl", text_field="prose", tier_filter="flattened"), tmp_path)
    assert named.texts == ["ignored"]


def test_shared_negatives_join_every_head_and_configs_are_checked(tmp_path):
    config_path = write_corpora(tmp_path, per_tier=5)
    config = load_config(config_path)
    merged = effective_negatives_per_head(config)
    for head in config.heads:
        assert merged[head.name][-1].path == "external.jsonl"
    labelled = build_labelled_set(config, tmp_path)
    assert labelled.report["bad_rows"] == 2  # the two unreadable rows of external.jsonl
    ocean = labelled.head_names.index("ocean")
    assert int(labelled.positive[:, ocean].sum()) == 15
    assert labelled.report["per_head"]["ocean"]["negatives"] == 15 * 3 + 10  # other topics + external
    assert {labelled.labels[i]["ocean"] for i in range(len(labelled.texts)) if "ocean" in labelled.labels[i]} == {
        "positive", "soft_neg", "semi_firm_neg", "furthest_neg"}
    with pytest.raises(ValidationError, match="must contain"):
        BTRMConfig(heads=config.heads, meta_prompt="no placeholder")
    with pytest.raises(ValidationError, match="no weight"):
        BTRMConfig(heads=[{"name": "h", "positive_sources": [{"path": "a"}], "negative_sources": [{"path": "b", "neg_tier": "odd"}]}])


@pytest.fixture(scope="module")
def synthetic(tiny_model_dir, tmp_path_factory):
    """Synthetic corpora, and the tiny model's last-token features for them."""
    root = tmp_path_factory.mktemp("btrm")
    config = load_config(write_corpora(root / "corpora"))
    labelled = build_labelled_set(config, root / "corpora")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    features = last_token_features(model, encode(tok, config, labelled.texts))
    return config, labelled, features


def train(synthetic, **changes):
    config, labelled, features = synthetic
    return train_on_features(config.model_copy(update=changes), labelled.head_names, labelled.positive,
                             labelled.negative_weight, features)


def test_every_head_ranks_held_out_pairs_and_positives_centre_near_one(synthetic):
    result = train(synthetic)
    for name, accuracy in result.held_out_accuracy.items():
        assert accuracy >= 0.9, (name, result.held_out_accuracy)
    for name, stats in result.positive_scores.items():
        assert 0.6 < stats["median"] < 2.0, (name, stats)


def test_the_literal_form_drifts_positives_to_zero_and_the_default_does_not(synthetic):
    # Same data, same lambda (0.5, where the regulariser is clearly felt), only the form differs.
    squared, literal = train(synthetic, logsq="squared", logsq_lambda=0.5), train(synthetic, logsq="literal", logsq_lambda=0.5)
    literal_medians = [s["median"] for s in literal.positive_scores.values()]
    squared_medians = [s["median"] for s in squared.positive_scores.values()]
    # Near 0 against near 1: how near depends on the tiny model (0.27 seen at worst), the gap does not.
    assert all(abs(m) < 0.35 for m in literal_medians), literal.positive_scores
    assert all(abs(m - 1.0) < 0.5 for m in squared_medians), squared.positive_scores


def test_the_command_line_trains_and_scores(tiny_model_dir, tmp_path):
    hogwild = [sys.executable, "-m", "hogwild.cli"]
    subprocess.run([*hogwild, "btrm", "synth", "-o", str(tmp_path / "c"), "--per-tier", "12"], check=True)
    subprocess.run([*hogwild, "btrm", "gen-config", "-o", str(tmp_path / "template.yaml")], check=True)
    assert "meta_prompt" in (tmp_path / "template.yaml").read_text()
    decoders = subprocess.run([*hogwild, "btrm", "test-decoders", "-c", str(tmp_path / "c" / "config.yaml")],
                              capture_output=True, text=True, check=True)
    assert "line 25: not JSON" in decoders.stdout and "2 bad rows in all" in decoders.stderr
    inputs = subprocess.run([*hogwild, "btrm", "sample-inputs", "-c", str(tmp_path / "c" / "config.yaml"), "-n", "1"],
                            capture_output=True, text=True, check=True).stdout
    assert "=== fable" in inputs and "Passage:" in inputs
    subprocess.run([*hogwild, "btrm", "train", "-c", str(tmp_path / "c" / "config.yaml"), "-o", str(tmp_path / "heads"),
                    "--model", str(tiny_model_dir)], check=True, capture_output=True)
    assert (tmp_path / "heads" / "training.png").stat().st_size > 1000
    subprocess.run([*hogwild, "btrm", "score", "-m", str(tmp_path / "heads"), "-i", str(tmp_path / "c" / "forest.jsonl"),
                    "-o", str(tmp_path / "scores.jsonl")], check=True, capture_output=True)
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 36 and set(rows[0]["scores"]) == {"ocean", "forest", "machines", "kitchen", "fable", "ocean_prose"}
    assert sum(r["scores"]["forest"] > r["scores"]["ocean"] for r in rows) > 30


def test_a_trunk_lora_trains_with_the_heads_and_leaves_the_trunk_alone(tiny_model_dir, tmp_path):
    import yaml

    # 20 per tier: with 10 a head's held-out split is a handful of pairs and one of them decides.
    corpora = write_corpora(tmp_path / "c", per_tier=20)
    raw = yaml.safe_load(corpora.read_text())
    raw.update(trunk_lora=True, trunk_lora_epochs=2, batch_size=32)
    corpora.write_text(yaml.safe_dump(raw))
    before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items()}
    hogwild = [sys.executable, "-m", "hogwild.cli"]
    subprocess.run([*hogwild, "btrm", "train", "-c", str(corpora), "-o", str(tmp_path / "heads"), "--model", str(tiny_model_dir)],
                   check=True, capture_output=True)
    adapter = tmp_path / "heads" / "trunk_lora"
    assert (adapter / "adapter_model.safetensors").exists() and "lora_alpha" in (adapter / "adapter_config.json").read_text()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    lora_b = [t for k, t in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # B starts at zero: the adapter trained
    meta = json.loads((tmp_path / "heads" / "heads.json").read_text())
    assert min(meta["extra"]["held_out_accuracy"].values()) > 0.8
    assert_positives_above_zero(meta["extra"]["positive_scores"])
    after = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the trunk on disk is untouched
    subprocess.run([*hogwild, "btrm", "score", "-m", str(tmp_path / "heads"), "-i", str(tmp_path / "c" / "ocean.jsonl"),
                    "-o", str(tmp_path / "s.jsonl")], check=True, capture_output=True)
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 60


def assert_positives_above_zero(positive_scores: dict) -> None:
    """A collapsed head shows as its held-out positives centred below 0. Only heads with 8 or
    more held-out positives are judged: a median of 3 (the ``ocean_prose`` head of a small
    corpus) falls below 0 on some tiny models without any collapse."""
    judged = {name: s for name, s in positive_scores.items() if s["count"] >= 8}
    assert len(judged) >= 3, positive_scores
    assert all(s["median"] > 0 for s in judged.values()), positive_scores
