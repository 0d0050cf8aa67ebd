"""The readout trainer: concept vectors from a story corpus, with steering-vectors.

``train_steering_vector`` runs a forward pass for both texts of every
(positive, negative) pair; here a concept's positives are every other concept's
negatives, so that would repeat each story ~2 x n_concepts times. The trainer
therefore uses the two pieces ``train_steering_vector`` is made of:
``record_activations`` for one forward pass per unique text (read at its last
token, as the server's readout reads the position that chooses a token, and
cast to fp32), then ``aggregate_activations`` with the library's aggregators on
each concept's pairs. Pairs: the longer of the positive and negative lists is
walked once and the shorter cycled, so every story is used and the mean
aggregator gives mean(positives) - mean(negatives).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import Corpus
from .vectors import VectorSet, save_vector_set, unit_vector_set

AGGREGATORS = ("mean", "pca", "logistic")


def aggregator(name: str):
    """One of steering-vectors' aggregators, by name."""
    import steering_vectors

    if name not in AGGREGATORS:
        raise ValueError(f"aggregator {name!r} is not one of {AGGREGATORS}")
    return {"mean": steering_vectors.mean_aggregator, "pca": steering_vectors.pca_aggregator,
            "logistic": steering_vectors.logistic_aggregator}[name]()


@torch.no_grad()
def text_activations(model, tokenizer, texts: list[str], layers: list[int], progress: bool = True) -> dict[int, torch.Tensor]:
    """Residual stream after each decoder layer at each text's last token: layer -> (n_texts, hidden), fp32."""
    from steering_vectors import record_activations
    from tqdm.auto import tqdm

    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    device = next(model.parameters()).device
    for text in tqdm(texts, desc="readout: forward passes", unit="text", disable=not progress):
        ids = tokenizer(text, return_tensors="pt").to(device)
        with record_activations(model, "decoder_block", layer_nums=layers) as recorded:
            model(**ids)
        for layer in layers:
            out[layer].append(recorded[layer][-1][0, -1].to(torch.float32).cpu())
    return {layer: torch.stack(rows) for layer, rows in out.items()}


def paired_rows(n_pos: int, n_neg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices pairing positives with negatives: the longer list once, the shorter cycled."""
    n = max(n_pos, n_neg)
    return torch.arange(n) % n_pos, torch.arange(n) % n_neg


def concept_vectors(activations: dict[int, torch.Tensor], index: dict[str, int], corpus: Corpus,
                    aggregator_name: str = "mean") -> dict[int, torch.Tensor]:
    """layer -> (n_concepts, hidden): each concept's direction, by the chosen aggregator (not yet normalised)."""
    from steering_vectors import aggregate_activations

    agg = aggregator(aggregator_name)
    out = {layer: [] for layer in activations}
    for concept in corpus.concepts:
        pos = torch.tensor([index[t] for t in corpus.positives[concept]])
        neg = torch.tensor([index[t] for t in corpus.negatives(concept)])
        p, q = paired_rows(len(pos), len(neg))
        pos_acts = {layer: [acts[pos[p]]] for layer, acts in activations.items()}
        neg_acts = {layer: [acts[neg[q]]] for layer, acts in activations.items()}
        for layer, vector in aggregate_activations(pos_acts, neg_acts, agg).items():
            out[layer].append(vector.to(torch.float32))
    return {layer: torch.stack(rows) for layer, rows in out.items()}


@dataclass
class ReadoutTraining:
    vector_set: VectorSet
    report: dict
    triage: list[str]


def down_projections(model, layers: list[int]) -> dict[int, torch.Tensor] | None:
    """Each layer's MLP down-projection weight (hidden, intermediate), where the model has one."""
    try:
        return {layer: model.model.layers[layer].mlp.down_proj.weight.detach() for layer in layers}
    except AttributeError:
        return None


def train_readout(model, tokenizer, corpus: Corpus, layers: list[int], aggregator_name: str = "mean",
                  dtype: str = "float16", progress: bool = True) -> ReadoutTraining:
    """Concept vectors (unit-normalised) and their quality report."""
    from .quality import quality_report, triage

    num_layers = model.config.num_hidden_layers
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad or not layers:
        raise ValueError(f"layers {bad or layers} out of range: the model has layers 0..{num_layers - 1}")
    aggregator(aggregator_name)  # an unknown name fails before the forward passes
    texts = corpus.texts()
    index = {t: i for i, t in enumerate(texts)}
    activations = text_activations(model, tokenizer, texts, layers, progress)
    vector_set = unit_vector_set(corpus.concepts, concept_vectors(activations, index, corpus, aggregator_name), dtype)
    report = quality_report(
        corpus.concepts, vector_set.vectors, activations, texts,
        positives={c: [index[t] for t in corpus.positives[c]] for c in corpus.concepts},
        negatives={c: [index[t] for t in corpus.negatives(c)] for c in corpus.concepts},
        down_proj=down_projections(model, layers),
    )
    report["training"] = {"aggregator": aggregator_name, "layers": layers, "n_texts": len(texts),
                          "positives": {c: len(corpus.positives[c]) for c in corpus.concepts},
                          "n_baselines": len(corpus.baselines), "n_neutral": len(corpus.neutral),
                          "warnings": corpus.warnings}
    return ReadoutTraining(vector_set, report, triage(report))


def write_training(result: ReadoutTraining, out_dir: str | Path) -> dict[str, str]:
    """Write the runtime files (vectors, manifest) and the quality report (JSON + PNG heatmap)."""
    from .quality import write_heatmap

    out_dir = Path(out_dir)
    vectors = save_vector_set(result.vector_set, out_dir)
    quality = out_dir / "quality.json"
    quality.write_text(json.dumps(result.report, indent=1) + "\n")
    heatmap = write_heatmap(result.report, out_dir / "quality.png")
    return {"vectors": str(vectors), "manifest": str(out_dir / "readout.json"), "quality": str(quality),
            "heatmap": str(heatmap)}


def train_model_directory(model_dir: str | Path, stories: str | Path, out: str | Path, layers: list[int] | None = None,
                          aggregator_name: str = "mean", progress: bool = False) -> Path:
    """Vectors for a Hugging Face model directory (run in fp32) from a corpus
    directory, written to ``out``; ``layers`` None means all. Returns the vectors' path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .corpus import read_corpus

    corpus = read_corpus(stories)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    layers = list(range(model.config.num_hidden_layers)) if layers is None else layers
    result = train_readout(model, AutoTokenizer.from_pretrained(model_dir), corpus, layers, aggregator_name,
                           progress=progress)
    return Path(write_training(result, out)["vectors"])
