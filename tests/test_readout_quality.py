"""The concept-vector quality report, on synthetic activations with planted structure."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hogwild.readout.quality import REDUNDANT_R2, quality_report, triage, write_heatmap

HIDDEN = 32
N_STORIES = 18
JOY_OFF_STORIES = (3, 11)  # joy stories planted to point away from joy
LAYER = 7


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def planted():
    """Six concepts on orthonormal directions d0..d6 of a 32-dim space, plus neutral texts.

    joy: rank 1 along d0, except two stories along -d0 + d6;
    fear: clean rank 1 along d1;
    bliss: rank 1 along 0.6 d0 + 0.8 d1, so its vector lies in the span of joy's and fear's;
    awe: rank 3, six stories each on d2, d3, d4 with equal energy;
    calm: isotropic noise, no direction at all;
    anger: rank 1 along d5, independent of the rest.
    """
    rng = np.random.default_rng(0)
    d = np.linalg.qr(rng.standard_normal((HIDDEN, HIDDEN)))[0].T  # rows: orthonormal directions

    def rank1(direction, scale=5.0):
        return 0.2 * rng.standard_normal((N_STORIES, HIDDEN)) + np.outer(scale + 0.3 * rng.standard_normal(N_STORIES), direction)

    joy = rank1(d[0])
    for k in JOY_OFF_STORIES:
        joy[k] = 0.2 * rng.standard_normal(HIDDEN) - 2.0 * d[0] + 4.0 * d[6]
    stories = {
        "joy": joy,
        "fear": rank1(d[1]),
        "bliss": rank1(0.6 * d[0] + 0.8 * d[1]),
        "awe": 0.05 * rng.standard_normal((N_STORIES, HIDDEN)) + 3.0 * d[2 + np.arange(N_STORIES) % 3],
        "calm": rng.standard_normal((N_STORIES, HIDDEN)),
        "anger": rank1(d[5]),
    }
    # many quiet neutral texts keep the negatives' mean small, so it does not swamp the planted shapes
    neutral = 0.2 * rng.standard_normal((200, HIDDEN))

    concepts = list(stories)
    texts, rows, positives = [], [], {}
    for name, block in stories.items():
        positives[name] = list(range(len(texts), len(texts) + len(block)))
        texts += [f"{name} story {k}: " + "words " * 20 for k in range(len(block))]
        rows.append(block)
    neutral_rows = list(range(len(texts), len(texts) + len(neutral)))
    texts += [f"neutral text {k}" for k in range(len(neutral))]
    acts = np.vstack(rows + [neutral]).astype(np.float32)
    negatives = {c: [r for o in concepts if o != c for r in positives[o]] + neutral_rows for c in concepts}

    # the trainer's vectors: normalised mean differences
    vectors = np.stack([_unit(acts[positives[c]].mean(0) - acts[negatives[c]].mean(0)) for c in concepts])

    down_proj = rng.standard_normal((HIDDEN, 64))
    down_proj[:, 17] = -3.0 * vectors[concepts.index("fear")] + 0.05 * rng.standard_normal(HIDDEN)

    report = quality_report(concepts, {LAYER: vectors}, {LAYER: acts}, texts, positives, negatives,
                            down_proj={LAYER: down_proj})
    return {"report": report, "layer": report["layers"][str(LAYER)], "texts": texts, "positives": positives}


def test_rank1_concept_has_a_dominant_first_pc_and_noise_does_not(planted):
    concepts = planted["layer"]["concepts"]
    assert concepts["fear"]["first_pc_variance_ratio"] > 0.8
    assert concepts["fear"]["pcs_to_90"] == 1
    assert concepts["calm"]["first_pc_variance_ratio"] < 0.3
    assert concepts["calm"]["participation_ratio_signal"] > 5


def test_rank3_concept_needs_three_pcs(planted):
    awe = planted["layer"]["concepts"]["awe"]
    assert awe["pcs_to_90"] == 3
    assert awe["first_pc_variance_ratio"] == pytest.approx(1 / 3, abs=0.1)  # the negatives' mean adds a little shared offset
    assert awe["participation_ratio_signal"] == pytest.approx(3.0, abs=0.2)


def test_linear_combination_is_redundant_and_independent_concepts_are_not(planted):
    layer = planted["layer"]
    bliss = layer["concepts"]["bliss"]
    assert bliss["ridge_r2"] > REDUNDANT_R2
    assert "bliss" in layer["redundant"]
    assert {c["concept"] for c in bliss["top_contributors"][:2]} == {"joy", "fear"}
    # joy and fear are redundant too (each is bliss minus the other); awe and anger are not
    for name in ("awe", "anger"):
        assert layer["concepts"][name]["ridge_r2"] < 0.5
        assert name not in layer["redundant"]


def test_nearest_concepts_are_ordered_by_cosine(planted):
    layer = planted["layer"]
    nearest = layer["concepts"]["bliss"]["nearest"]
    assert [n["concept"] for n in nearest[:2]] == ["fear", "joy"]
    assert len(nearest) == 5
    cosines = [n["cosine"] for n in nearest]
    assert cosines == sorted(cosines, reverse=True)
    names = list(layer["concepts"])
    assert nearest[0]["cosine"] == pytest.approx(layer["cosines"][names.index("bliss")][names.index("fear")])


def test_best_neuron_finds_the_planted_column_with_its_sign(planted):
    best = planted["layer"]["concepts"]["fear"]["best_neuron"]
    assert best["index"] == 17
    assert best["cosine"] < -0.99


def test_outliers_are_the_off_direction_stories(planted):
    joy = planted["layer"]["concepts"]["joy"]
    expected = {planted["texts"][planted["positives"]["joy"][k]][:100] for k in JOY_OFF_STORIES}
    assert {o["text"] for o in joy["outliers"]} == expected
    assert all(o["alignment"] < 0 for o in joy["outliers"])
    assert joy["min_alignment"] == min(o["alignment"] for o in joy["outliers"])
    assert joy["mean_alignment"] > 0.5
    assert all(len(o["text"]) <= 100 for o in joy["outliers"])


def test_report_is_plain_json(planted):
    report = planted["report"]
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    assert report["version"] == 1
    assert np.asarray(planted["layer"]["cosines"]).shape == (6, 6)


def test_heatmap_writes_a_png(planted, tmp_path):
    path = write_heatmap(planted["report"], tmp_path / "plots" / "cosines.png")
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_triage_names_the_redundant_concept_and_the_stories_against_it(planted):
    lines = triage(planted["report"])
    assert any("redundant" in line and "bliss" in line for line in lines)
    assert any("joy story 3" in line for line in lines)
    assert lines[-1].startswith("quality: 6 concepts x 1 layers")
    assert len(lines) <= 15


def test_participation_ratio_by_hand():
    # signal rows (√3, 0) and (0, 1) against a zero negative: λ = 3 and 1, PR = (3+1)² / (9+1) = 1.6.
    # Centred on their own mean the two rows are ±(√3/2, -1/2): one direction, PR = 1.
    acts = np.array([[math.sqrt(3), 0.0], [0.0, 1.0], [0.0, 0.0]])
    report = quality_report(["only"], {0: np.array([[1.0, 0.0]])}, {0: acts}, ["a", "b", "zero"],
                            {"only": [0, 1]}, {"only": [2]})
    only = report["layers"]["0"]["concepts"]["only"]
    assert only["participation_ratio_signal"] == pytest.approx(1.6)
    assert only["first_pc_variance_ratio"] == pytest.approx(0.75)
    assert only["pcs_to_90"] == 2
    assert only["participation_ratio_full"] == pytest.approx(1.0)
    # a lone concept has no neighbours to compare with
    assert only["nearest"] == [] and only["ridge_r2"] is None and only["top_contributors"] == []
    assert only["best_neuron"] is None
    assert report["layers"]["0"]["redundant"] == []


def test_single_positive_and_torch_inputs_do_not_crash():
    torch = pytest.importorskip("torch")
    acts = torch.tensor([[1.0, 2.0], [0.5, 0.0], [0.0, 0.5]], dtype=torch.bfloat16)
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    report = quality_report(["a", "b"], {3: vectors}, {3: acts}, ["x", "y", "z"],
                            {"a": [0], "b": []}, {"a": [1, 2], "b": [0, 1, 2]},
                            down_proj={3: torch.eye(2)})
    a, b = report["layers"]["3"]["concepts"]["a"], report["layers"]["3"]["concepts"]["b"]
    assert a["participation_ratio_full"] == 0.0
    assert a["pcs_to_90"] == 1 and a["first_pc_variance_ratio"] == pytest.approx(1.0)
    assert len(a["outliers"]) == 1
    assert a["best_neuron"] == {"index": 0, "cosine": 1.0}
    assert b["mean_alignment"] is None and b["participation_ratio_full"] is None and b["outliers"] == []
    json.dumps(report, allow_nan=False)
    assert triage(report)[-1].startswith("quality: 2 concepts")
