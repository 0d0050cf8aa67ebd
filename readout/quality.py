"""Quality report for trained concept vectors.

Given, per hooked layer, the unit-norm concept vectors and the activations of
the texts they were trained on, this measures how well each vector describes
its own stories (spectrum of the signal, per-story alignment), how it relates
to the other concepts (cosines, ridge redundancy) and, when the layer's MLP
down-projection is given, which single neuron writes closest to it.

Everything returned is plain JSON (floats, ints, strings, lists, dicts) so the
trainer can store it next to the vectors. numpy, scikit-learn and matplotlib
only; torch tensors are accepted wherever an array is.
"""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
from sklearn.linear_model import Ridge

REPORT_VERSION = 1
REDUNDANT_R2 = 0.9  # a vector the others explain this well adds little of its own
CLOSE_COSINE = 0.8  # pairs above this are near-duplicates worth a look
WEAK_ALIGNMENT = 0.1  # mean story alignment below this: the vector hardly describes its stories
RIDGE_ALPHA = 1e-2  # small: only there to keep near-collinear regressors stable
N_NEAREST = 5
N_OUTLIERS = 2
N_CONTRIBUTORS = 3
OUTLIER_TEXT_CHARS = 100
_DIGITS = 6  # enough for any reading of the report, keeps the JSON short


def _as_array(x: Any) -> np.ndarray:
    """A float64 numpy copy of an array or a torch tensor (any dtype or device)."""
    if hasattr(x, "detach"):  # torch tensor: bf16 and CUDA need converting before numpy sees it
        x = x.detach().float().cpu()
    return np.asarray(x, dtype=np.float64)


def _num(x: float) -> float:
    return round(float(x), _DIGITS)


def _unit_rows(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; all-zero rows stay zero (cosine 0 rather than NaN)."""
    norms = np.linalg.norm(m, axis=-1, keepdims=True)
    return np.divide(m, norms, out=np.zeros_like(m), where=norms > 0)


def _spectrum(m: np.ndarray) -> dict:
    """Variance-shape statistics of the uncentred rows of ``m``, from λ = σ²."""
    if m.shape[0] == 0:
        return {"first_pc_variance_ratio": None, "pcs_to_90": None, "participation_ratio": None}
    lam = np.linalg.svd(m, compute_uv=False) ** 2
    total = lam.sum()
    if total <= 0:
        return {"first_pc_variance_ratio": 0.0, "pcs_to_90": None, "participation_ratio": 0.0}
    cumulative = np.cumsum(lam) / total
    # the tolerance keeps an exact 0.9 from being missed to rounding
    pcs_to_90 = int(np.searchsorted(cumulative, 0.9 - 1e-12) + 1)
    return {
        "first_pc_variance_ratio": _num(lam[0] / total),
        "pcs_to_90": pcs_to_90,
        "participation_ratio": _num(total**2 / (lam**2).sum()),
    }


def _ridge(target: np.ndarray, others: np.ndarray) -> tuple[float | None, np.ndarray]:
    """R² and coefficients of ``target`` regressed on the rows of ``others`` (hidden dims are samples)."""
    if others.shape[0] == 0:
        return None, np.zeros(0)
    model = Ridge(alpha=RIDGE_ALPHA, fit_intercept=False).fit(others.T, target)
    resid = target - model.predict(others.T)
    spread = float(((target - target.mean()) ** 2).sum())
    if spread <= 0:
        return None, model.coef_
    return 1.0 - float((resid**2).sum()) / spread, model.coef_


def _concept_entry(
    i: int,
    concepts: list[str],
    unit_vectors: np.ndarray,
    cosines: np.ndarray,
    acts: np.ndarray,
    texts: list[str],
    pos: list[int],
    neg: list[int],
    neuron_dirs: np.ndarray | None,
) -> dict:
    vector = unit_vectors[i]
    # without negatives there is nothing to contrast against: the signal is the raw activation
    neg_mean = acts[neg].mean(axis=0) if neg else np.zeros(acts.shape[1])
    signal = acts[pos] - neg_mean
    sig = _spectrum(signal)
    if len(pos) >= 2:
        full_pr = _spectrum(acts[pos] - acts[pos].mean(axis=0))["participation_ratio"]
    else:
        full_pr = 0.0 if pos else None  # one story has no spread of its own

    alignment = _unit_rows(signal) @ vector
    order = np.argsort(alignment, kind="stable")[:N_OUTLIERS]
    outliers = [{"text": texts[pos[k]][:OUTLIER_TEXT_CHARS], "alignment": _num(alignment[k])} for k in order]

    others = [j for j in range(len(concepts)) if j != i]
    nearest = sorted(others, key=lambda j: -cosines[i, j])[:N_NEAREST]
    r2, coef = _ridge(vector, unit_vectors[others])
    top = np.argsort(-np.abs(coef), kind="stable")[:N_CONTRIBUTORS]

    best_neuron = None
    if neuron_dirs is not None:
        neuron_cos = neuron_dirs @ vector
        j = int(np.argmax(np.abs(neuron_cos)))
        best_neuron = {"index": j, "cosine": _num(neuron_cos[j])}

    return {
        "n_positives": len(pos),
        "n_negatives": len(neg),
        "first_pc_variance_ratio": sig["first_pc_variance_ratio"],
        "pcs_to_90": sig["pcs_to_90"],
        "participation_ratio_signal": sig["participation_ratio"],
        "participation_ratio_full": full_pr,
        "mean_alignment": _num(alignment.mean()) if pos else None,
        "min_alignment": _num(alignment.min()) if pos else None,
        "outliers": outliers,
        "nearest": [{"concept": concepts[j], "cosine": _num(cosines[i, j])} for j in nearest],
        "ridge_r2": None if r2 is None else _num(r2),
        "top_contributors": [{"concept": concepts[others[k]], "coef": _num(coef[k])} for k in top],
        "best_neuron": best_neuron,
    }


def quality_report(
    concepts: list[str],
    vectors: dict[int, Any],
    activations: dict[int, Any],
    texts: list[str],
    positives: dict[str, list[int]],
    negatives: dict[str, list[int]],
    down_proj: dict[int, Any] | None = None,
) -> dict:
    """Measure each layer's concept vectors against the texts they were trained on.

    ``vectors[layer]`` is (n_concepts, hidden), row i for ``concepts[i]``;
    ``activations[layer]`` is (n_texts, hidden) in the order of ``texts``;
    ``positives``/``negatives`` map a concept to row indices of its texts;
    ``down_proj[layer]`` (optional) is the MLP down-projection weight in HF
    layout (hidden, intermediate), so column j is neuron j's write direction.

    Per concept:

    * signal = positive activations minus the mean negative activation; from its
      uncentred spectrum (λ = σ²): ``first_pc_variance_ratio`` (λ1/Σλ),
      ``pcs_to_90`` (fewest components reaching 90 %), ``participation_ratio_signal``
      ((Σλ)²/Σλ²);
    * ``participation_ratio_full``: the same ratio for the positive activations
      centred on their own mean (0.0 with a single positive, None with none);
    * ``mean_alignment``/``min_alignment``: cosine of each signal row with the
      vector; ``outliers``: the two least aligned stories (first 100 chars);
    * ``nearest``: up to five other concepts by vector cosine, closest first;
    * ``ridge_r2``/``top_contributors``: the vector regressed on all other
      vectors (ridge, no intercept, hidden dims as samples), top three by |coef|;
      concepts above ``REDUNDANT_R2`` are listed in the layer's ``redundant``;
    * ``best_neuron``: the down_proj column with the largest |cosine| (signed
      cosine reported), or None without ``down_proj``.

    Per layer ``cosines`` is the concept-by-concept cosine matrix as nested lists.
    Note that with fewer hidden dims than concepts every vector is explained by
    the others, so R² is only meaningful when hidden >> n_concepts.
    """
    report: dict = {"version": REPORT_VERSION, "layers": {}}
    for layer in sorted(vectors):
        unit_vectors = _unit_rows(_as_array(vectors[layer]))
        if unit_vectors.shape[0] != len(concepts):
            raise ValueError(f"layer {layer}: {unit_vectors.shape[0]} vectors for {len(concepts)} concepts")
        acts = _as_array(activations[layer])
        cosines = unit_vectors @ unit_vectors.T
        neuron_dirs = None
        if down_proj is not None and layer in down_proj:
            weight = _as_array(down_proj[layer])
            if weight.shape[0] != unit_vectors.shape[1]:
                raise ValueError(f"layer {layer}: down_proj {weight.shape} is not (hidden={unit_vectors.shape[1]}, intermediate)")
            neuron_dirs = _unit_rows(weight.T)
        entries = {
            name: _concept_entry(i, concepts, unit_vectors, cosines, acts, texts,
                                 list(positives.get(name, [])), list(negatives.get(name, [])), neuron_dirs)
            for i, name in enumerate(concepts)
        }
        report["layers"][str(layer)] = {
            "concepts": entries,
            "redundant": [n for n, e in entries.items() if e["ridge_r2"] is not None and e["ridge_r2"] > REDUNDANT_R2],
            "cosines": [[_num(c) for c in row] for row in cosines],
        }
    return report


def _last_layer(report: dict) -> str:
    if not report["layers"]:
        raise ValueError("report has no layers")
    return max(report["layers"], key=int)


def write_heatmap(report: dict, path: Path, layer: int | None = None) -> Path:
    """Write a PNG heatmap of one layer's concept-concept cosines (default: the last layer); return ``path``."""
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no open-figure bookkeeping.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = _last_layer(report) if layer is None else str(layer)
    if key not in report["layers"]:
        raise KeyError(f"layer {key} is not in the report (has {sorted(report['layers'], key=int)})")
    names = list(report["layers"][key]["concepts"])
    matrix = np.asarray(report["layers"][key]["cosines"], dtype=float).reshape(len(names), len(names))

    side = max(4.0, 0.35 * len(names) + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), labels=names, rotation=90)
    ax.set_yticks(range(len(names)), labels=names)
    if len(names) <= 12:  # values stay legible only on small grids
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"concept vector cosines, layer {key}")
    fig.colorbar(image, ax=ax, shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


_MAX_ITEMS = 8  # per triage line, so 30 concepts still fit on a screen
_MAX_STORIES = 5  # story lines per layer


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_ITEMS])
    return shown + (f", +{len(items) - _MAX_ITEMS} more" if len(items) > _MAX_ITEMS else "")


def triage(report: dict) -> list[str]:
    """Short human-readable findings for the end of a training run, per layer then one summary line.

    Lists redundant concepts (with their top contributor), concept pairs with
    cosine above ``CLOSE_COSINE``, concepts whose mean story alignment is below
    ``WEAK_ALIGNMENT`` and outlier stories that point against their vector.
    Long lists are cut, so the output stays a screenful.
    """
    lines: list[str] = []
    first_pc: list[float] = []
    participation: list[float] = []
    for key in sorted(report["layers"], key=int):
        layer = report["layers"][key]
        entries = layer["concepts"]
        names = list(entries)
        found: list[str] = []

        redundant = []
        for name in layer["redundant"]:
            entry = entries[name]
            top = entry["top_contributors"][0] if entry["top_contributors"] else None
            mostly = f", mostly {top['concept']} {top['coef']:+.2f}" if top else ""
            redundant.append(f"{name} (R² {entry['ridge_r2']:.2f}{mostly})")
        if redundant:
            found.append(f"layer {key}: redundant (R² > {REDUNDANT_R2}): {_listing(redundant)}")

        cos = layer["cosines"]
        close = sorted(((cos[i][j], names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))
                        if cos[i][j] > CLOSE_COSINE), reverse=True)
        if close:
            found.append(f"layer {key}: close pairs (cos > {CLOSE_COSINE}): {_listing([f'{a}/{b} {c:.2f}' for c, a, b in close])}")

        weak = sorted((e["mean_alignment"], n) for n, e in entries.items()
                      if e["mean_alignment"] is not None and e["mean_alignment"] < WEAK_ALIGNMENT)
        if weak:
            found.append(f"layer {key}: weak story alignment (< {WEAK_ALIGNMENT}): {_listing([f'{n} {a:.2f}' for a, n in weak])}")

        against = sorted((o["alignment"], n, o["text"]) for n, e in entries.items() for o in e["outliers"] if o["alignment"] < 0)
        if against:
            found.append(f"layer {key}: stories pointing against their vector:")
            for a, n, text in against[:_MAX_STORIES]:
                snippet = " ".join(text.split())[:60]
                found.append(f"  {n} {a:+.2f}: {snippet!r}")
            if len(against) > _MAX_STORIES:
                found.append(f"  ... and {len(against) - _MAX_STORIES} more")

        lines.extend(found or [f"layer {key}: nothing flagged"])
        first_pc += [e["first_pc_variance_ratio"] for e in entries.values() if e["first_pc_variance_ratio"] is not None]
        participation += [e["participation_ratio_signal"] for e in entries.values() if e["participation_ratio_signal"] is not None]

    n_concepts = max((len(layer["concepts"]) for layer in report["layers"].values()), default=0)
    summary = f"quality: {n_concepts} concepts x {len(report['layers'])} layers"
    if first_pc:
        summary += f"; median first-PC ratio {median(first_pc):.2f}, median signal participation ratio {median(participation):.2f}"
    lines.append(summary)
    return lines
