"""BTRM configuration and data: YAML config, JSONL decoders, the labelled set.

Config (YAML)::

    meta_prompt: "...{text}..."          # wraps every sample, positive and negative alike
    heads:
      - name: ocean
        description: passages about the sea
        positive_sources: [{path: ocean.jsonl, text_field: auto, tier_filter: [flattened]}]
        negative_sources: [{path: forest.jsonl, neg_tier: soft_neg}]
    shared_negatives:                    # merged into every head's negatives at load time
      - {path: external.jsonl, neg_tier: furthest_neg}

Decoders: ``tier_filter`` keeps rows whose ``tier`` is listed; ``text_field:
auto`` reads ``text`` for the ``flattened`` tier, ``prose`` for ``fk_normed``
and ``brainrot_aesop*``, else the first string field of the row that is not
metadata (``id``, ``uuid``, ``tier``, ``source``, ``label``). Rows that
cannot be read are counted and reported with their line numbers, never
silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hogwild.contracts.btrm_config import BTRMConfig, SourceSpec, effective_negatives_per_head

# ---- decoding -----------------------------------------------------------------


METADATA_FIELDS = ("id", "uuid", "tier", "source", "label")  # strings that are never the text


def auto_text_field(row: dict) -> str | None:
    """``text`` for the flattened tier, ``prose`` for fk_normed and brainrot_aesop*,
    else the first string field that is not metadata (an ``id`` is never the text)."""
    tier = str(row.get("tier", ""))
    if tier == "flattened" and isinstance(row.get("text"), str):
        return "text"
    if (tier == "fk_normed" or tier.startswith("brainrot_aesop")) and isinstance(row.get("prose"), str):
        return "prose"
    return next((k for k, v in row.items() if isinstance(v, str) and k not in METADATA_FIELDS), None)


@dataclass
class DecodedSource:
    path: str
    texts: list[str] = field(default_factory=list)
    rows: int = 0
    filtered_out: int = 0  # rows whose tier was not in tier_filter
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)

    def summary(self) -> dict:
        return {"path": self.path, "rows": self.rows, "texts": len(self.texts), "filtered_out": self.filtered_out,
                "bad_rows": len(self.bad), "bad_examples": self.bad[:5]}


def decode_source(spec: SourceSpec, base_dir: Path) -> DecodedSource:
    """Read one JSONL source; every row is either a text, filtered out, or reported bad."""
    path = Path(spec.path) if Path(spec.path).is_absolute() else base_dir / spec.path
    out = DecodedSource(str(path))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        out.bad.append((0, f"cannot read the file: {exc}"))
        return out
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        out.rows += 1
        try:
            row = json.loads(line)
        except ValueError as exc:
            out.bad.append((number, f"not JSON: {exc}"))
            continue
        if not isinstance(row, dict):
            out.bad.append((number, "not a JSON object"))
            continue
        if spec.tier_filter is not None and row.get("tier") not in spec.tier_filter:
            out.filtered_out += 1
            continue
        key = auto_text_field(row) if spec.text_field == "auto" else spec.text_field
        text = row.get(key) if key else None
        if not isinstance(text, str) or not text.strip():
            out.bad.append((number, f"no text in field {key or '(none found)'!r}"))
            continue
        out.texts.append(text)
    return out


# ---- the labelled set ---------------------------------------------------------------


@dataclass
class LabelledSet:
    """Unique texts with, per head, positive membership and negative tier weights."""

    head_names: list[str]
    texts: list[str]
    positive: torch.Tensor  # (N, H) bool
    negative_weight: torch.Tensor  # (N, H) float, 0 where not a negative
    report: dict
    labels: list[dict[str, str]]  # per text: head -> "positive" or its negative tier

    @property
    def negative(self) -> torch.Tensor:
        return self.negative_weight > 0

    def subset(self, index: torch.Tensor) -> "LabelledSet":
        rows = index.tolist()
        return LabelledSet(self.head_names, [self.texts[i] for i in rows], self.positive[index],
                           self.negative_weight[index], self.report, [self.labels[i] for i in rows])


def build_labelled_set(config: BTRMConfig, base_dir: Path) -> LabelledSet:
    """Decode every source and label each unique text for each head."""
    names = [h.name for h in config.heads]
    index: dict[str, int] = {}
    pos: list[set[int]] = []
    neg: list[dict[int, tuple[float, str]]] = []  # head -> (weight, tier)
    decoded: dict[str, dict] = {}
    conflicts = {n: 0 for n in names}

    def row_of(text: str) -> int:
        if text not in index:
            index[text] = len(index)
            pos.append(set())
            neg.append({})
        return index[text]

    def read(spec: SourceSpec) -> list[str]:
        result = decode_source(spec, base_dir)
        decoded[f"{spec.path} {spec.tier_filter or ''}".strip()] = result.summary()
        return result.texts

    negatives = effective_negatives_per_head(config)
    for h, head in enumerate(config.heads):
        for spec in head.positive_sources:
            for text in read(spec):
                pos[row_of(text)].add(h)
        for spec in negatives[head.name]:
            tier = spec.neg_tier or config.default_neg_tier
            for text in read(spec):
                r = row_of(text)
                if h in pos[r]:
                    conflicts[head.name] += 1  # a positive of this head stays a positive
                elif config.tier_weights[tier] > neg[r].get(h, (0.0, ""))[0]:
                    neg[r][h] = (config.tier_weights[tier], tier)
    n = len(index)
    positive = torch.zeros(n, len(names), dtype=torch.bool)
    negative_weight = torch.zeros(n, len(names))
    labels: list[dict[str, str]] = []
    for r in range(n):
        row = {}
        for h in pos[r]:
            positive[r, h] = True
            row[names[h]] = "positive"
        for h, (w, tier) in neg[r].items():
            if h not in pos[r]:
                negative_weight[r, h] = w
                row[names[h]] = tier
        labels.append(row)
    report = {
        "sources": decoded,
        "texts": n,
        "per_head": {name: {"positives": int(positive[:, h].sum()), "negatives": int((negative_weight[:, h] > 0).sum()),
                            "positive_and_negative_conflicts": conflicts[name]} for h, name in enumerate(names)},
        "bad_rows": sum(s["bad_rows"] for s in decoded.values()),
    }
    return LabelledSet(names, list(index), positive, negative_weight, report, labels)
