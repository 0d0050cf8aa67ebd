"""Readout: the vector file format, the corpus rules, the wire format, and a
trainer that must find directions planted in the tiny model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hogwild.contracts.readout_wire import ReadoutStep, choice_index, decode, encode
from hogwild.readout.corpus import CorpusError, read_corpus
from hogwild.readout.train import concept_vectors, paired_rows, text_activations, train_readout, write_training
from hogwild.readout.vectors import (
    ReadoutFileError,
    check_vector_set,
    load_vector_set,
    save_vector_set,
    unit_vector_set,
    vectors_key,
)

REPO = Path(__file__).resolve().parents[1]


def manifest(**over) -> dict:
    return {"concepts": ["a", "b"], "layers": [0, 1], "hidden_size": 8, "dtype": "float16", **over}


def tensors(n=2, hidden=8, layers=(0, 1)) -> dict:
    return {vectors_key(x): torch.randn(n, hidden) for x in layers}


def test_a_written_set_reads_back_and_fits_the_model(tmp_path):
    vs = unit_vector_set(["a", "b", "c"], {0: torch.randn(3, 8), 3: torch.randn(3, 8)})
    save_vector_set(vs, tmp_path)
    assert json.loads((tmp_path / "readout.json").read_text()) == {
        "concepts": ["a", "b", "c"], "layers": [0, 3], "hidden_size": 8, "dtype": "float16"}
    back = load_vector_set(tmp_path / "readout.safetensors", hidden_size=8, num_layers=4)
    for layer in (0, 3):
        assert torch.allclose(back.vectors[layer].norm(dim=-1), torch.ones(3), atol=1e-3)
        assert torch.allclose(back.vectors[layer], vs.vectors[layer], atol=1e-3)


@pytest.mark.parametrize("man, ts, kw, says", [
    (manifest(hidden_size=16), tensors(), {"hidden_size": 8}, "hidden_size 16 does not match the served model's 8"),
    (manifest(layers=[0, 4]), tensors(layers=(0, 4)), {"num_layers": 4}, "layer 4 is out of range"),
    (manifest(), tensors(layers=(0,)), {}, "missing tensor 'layer_1.vectors'"),
    (manifest(), {**tensors(), "layer_0.vectors": torch.full((2, 8), float("nan"))}, {}, "NaN"),
    (manifest(), tensors(n=3), {}, "expected (2, 8)"),
    (manifest(dtype="int8"), tensors(), {}, "'dtype'"),
    (manifest(concepts=["a", "a"]), tensors(), {}, "twice"),
    ({"concepts": ["a", "b"], "layers": [0, 1]}, tensors(), {}, "lacks hidden_size, dtype"),
    (manifest(), {**tensors(), "layer_7.vectors": torch.zeros(2, 8)}, {}, "not named by the manifest"),
])
def test_a_set_that_does_not_fit_is_refused_naming_the_problem(man, ts, kw, says):
    with pytest.raises(ReadoutFileError, match=None) as err:
        check_vector_set(man, ts, **kw)
    assert says in str(err.value)


def test_unreadable_files_are_refused(tmp_path):
    (tmp_path / "readout.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "readout.json").write_text(json.dumps(manifest()))
    with pytest.raises(ReadoutFileError, match="not a safetensors file"):
        load_vector_set(tmp_path / "readout.safetensors")
    with pytest.raises(ReadoutFileError, match="no such file"):
        load_vector_set(tmp_path / "missing.safetensors")


def test_wire_messages_round_trip_and_map_to_choices():
    step = ReadoutStep("v", 2, 3, ["1.00ff00ff00ff00ff"] * 2, ["cmpl-x-0-abcdef12", "cmpl-x-1-abcdef12"], [5, 7], [4, 0],
                       [1, 2])
    values = np.arange(18, dtype=np.float32).reshape(3, 2, 3)
    back, back_values = decode(encode(step, values))
    assert back == step and np.array_equal(back_values, values)
    with pytest.raises(ValueError, match="version"):
        decode([json.dumps({"v": 99, "rows": []}).encode(), b""])
    with pytest.raises(ValueError, match="payload holds 12 values, its header says 18"):
        decode([encode(step, values)[0], values[:2].tobytes()])
    with pytest.raises(ValueError, match="columns of different lengths"):
        decode(encode(ReadoutStep("v", 2, 3, ["k"], [], [5], [4], [1]), values[:1]))
    # vLLM 0.32's request ids: <external>-<8 random>, samples of n > 1 as <k>_<that>.
    assert choice_index("chatcmpl-abc-12345678", 1) == 0
    assert choice_index("cmpl-my-id-2-12345678", 1) == 2
    assert choice_index("1_cmpl-base-3-12345678", 2) == 7
    assert choice_index("0_chatcmpl-abc-12345678", 3) == 0


def test_readout_values_print_short_and_read_back_exactly():
    from hogwild.plugin.api_server.readout_http import readout_json

    for scale in (1e-38, 1e-20, 1e-6, 1.0, 1e3, 3e9, 1e30):
        values = (np.random.default_rng(0).standard_normal((50, 4, 25)) * scale).astype(np.float32)
        assert np.array_equal(np.array(json.loads(bytes(readout_json(values))), np.float32), values), scale
    rows = [np.array([1.5, -123.456, 0.0], np.float32), None]
    assert bytes(readout_json(rows)) == b"[[1.5,-123.456,0.0],null]"


def write(path: Path, stories: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(stories) + "\n")


def test_corpus_rules(tmp_path):
    write(tmp_path / "joy.txt", [f"joy story {i}\nsecond line" for i in range(4)])
    write(tmp_path / "fear.txt", [f"fear story {i}" for i in range(3)])
    write(tmp_path / "paired/platform/baseline.txt", ["the train came", "the train left"])
    write(tmp_path / "paired/platform/fear.txt", ["the train came, too fast"])
    write(tmp_path / "direct/_neutral.txt", ["rain tomorrow", "boil for ten minutes"])
    (tmp_path / "direct/doubt.txt").write_text("\n \n")
    corpus = read_corpus(tmp_path)
    assert corpus.concepts == ["fear", "joy"]
    assert corpus.positives["joy"][0] == "joy story 0\nsecond line"  # a single newline stays inside a story
    assert len(corpus.positives["fear"]) == 4  # stories/ and paired/
    assert any("doubt.txt: empty, skipped" in w for w in corpus.warnings)
    negatives = corpus.negatives("joy")
    assert set(negatives) == set(corpus.positives["fear"]) | {"the train came", "the train left", "rain tomorrow",
                                                               "boil for ten minutes"}
    assert not set(negatives) & set(corpus.positives["joy"])
    assert len(corpus.texts()) == 4 + 4 + 2 + 2
    write(tmp_path / "awe.txt", ["one", "two"])
    with pytest.raises(CorpusError, match=r"fewer than 4 stories for: awe \(2\)"):
        read_corpus(tmp_path)


def test_too_few_positives_is_an_error_before_any_model_is_loaded(tmp_path):
    write(tmp_path / "joy.txt", ["a", "b"])
    write(tmp_path / "fear.txt", ["c", "d", "e", "f"])
    run = subprocess.run([sys.executable, "-m", "hogwild.cli", "readout", "train", "--model", str(tmp_path / "no-model"),
                          "--stories", str(tmp_path), "--layers", "0", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "fewer than 4 stories for: joy (2)" in run.stderr
    assert "no-model" not in run.stderr  # it never got as far as the model


def test_the_project_corpus_meets_its_own_rules():
    corpus = read_corpus(REPO / "stories")
    assert len(corpus.concepts) >= 24
    scenarios = [p for p in (REPO / "stories/paired").iterdir() if p.is_dir()]
    assert len(scenarios) >= 4
    for scenario in scenarios:
        assert (scenario / "baseline.txt").is_file() and len(list(scenario.glob("*.txt"))) >= 5, scenario
    assert list((REPO / "stories/direct").glob("_*.txt")) and corpus.neutral
    assert not corpus.warnings


# -- a model where the answer is known ------------------------------------------

TRIGGERS = {"joy": " door", "fear": " window", "awe": " light", "doubt": " water", "calm": " table", "envy": " chair"}
FILLER = " the and readout vector request worker checkpoint".split()


@pytest.fixture(scope="module")
def planted(tiny_model_dir):
    """The tiny model with one orthogonal direction added to each concept's trigger
    word embedding, and a corpus whose stories end in their concept's trigger."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    hidden = model.config.hidden_size
    directions = torch.linalg.qr(torch.randn(hidden, len(TRIGGERS), generator=torch.Generator().manual_seed(0)))[0].T
    with torch.no_grad():
        for d, word in zip(directions, TRIGGERS.values()):
            ids = tok.encode(word)
            assert len(ids) == 1, f"{word!r} must be one token of the tiny tokenizer"
            model.model.embed_tokens.weight[ids[0]] += 2.0 * d
    rng = random.Random(0)

    def story(concept):
        return " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 12))) + TRIGGERS[concept]

    from hogwild.readout.corpus import Corpus

    corpus = Corpus({c: [story(c) for _ in range(8)] for c in TRIGGERS},
                    neutral=[" ".join(rng.choice(FILLER) for _ in range(8)) for _ in range(6)])
    held_out = {c: [story(c) for _ in range(5)] for c in TRIGGERS}
    return model, tok, corpus, dict(zip(TRIGGERS, directions)), held_out


@pytest.mark.parametrize("aggregator", ["mean", "pca", "logistic"])
def test_the_trainer_finds_planted_directions(planted, aggregator, tmp_path):
    model, tok, corpus, directions, held_out = planted
    result = train_readout(model, tok, corpus, [0, 1], aggregator, dtype="float32", progress=False)
    vs = result.vector_set
    for layer in (0, 1):
        for i, concept in enumerate(vs.concepts):
            assert vs.vectors[layer][i].norm().item() == pytest.approx(1.0, abs=1e-5)
            if aggregator != "logistic":  # logistic weights separate, they need not point along d
                cos = float(vs.vectors[layer][i] @ directions[concept])
                assert cos > 0.8, (layer, concept, cos)
    # Held-out stories: the readout ranks their own concept first.
    texts = [t for c in vs.concepts for t in held_out[c]]
    acts = text_activations(model, tok, texts, [1], progress=False)[1]
    chosen = (acts @ vs.vectors[1].T).argmax(dim=1).tolist()
    truth = [i for i, c in enumerate(vs.concepts) for _ in held_out[c]]
    assert np.mean(np.array(chosen) == np.array(truth)) >= 0.9
    written = write_training(result, tmp_path)
    report = json.loads(Path(written["quality"]).read_text())
    assert report["layers"]["1"]["concepts"]["joy"]["mean_alignment"] > 0.5
    assert Path(written["heatmap"]).stat().st_size > 1000


def test_one_forward_per_text_agrees_with_train_steering_vector(planted):
    from steering_vectors import train_steering_vector

    model, tok, corpus, _, _ = planted
    texts = corpus.texts()
    index = {t: i for i, t in enumerate(texts)}
    ours = concept_vectors(text_activations(model, tok, texts, [1], progress=False), index, corpus, "mean")[1]
    concept = corpus.concepts[0]
    pos, neg = corpus.positives[concept], corpus.negatives(concept)
    p, q = paired_rows(len(pos), len(neg))
    theirs = train_steering_vector(model, tok, [(pos[i], neg[j]) for i, j in zip(p.tolist(), q.tolist())], layers=[1],
                                   read_token_index=-1).layer_activations[1]
    assert torch.allclose(ours[0], theirs.float(), atol=1e-5)
