"""The story corpus the readout trainer learns concept vectors from.

Layout (see ``stories/README.md``)::

    stories/<concept>.txt                   a concept's stories
    stories/paired/<scenario>/baseline.txt  one setting told with a flat inner state
    stories/paired/<scenario>/<concept>.txt the same setting, that concept's inner state
    stories/direct/<concept>.txt            more of a hard concept's positives
    stories/direct/_<anything>.txt          neutral prose: a negative for every concept, never a positive

Stories within a file are separated by a blank line. A concept's positives are
its stories from all three places; its negatives are every other concept's
positives, the baselines and the ``_`` files. Empty files are skipped with a
warning; a concept with fewer than ``min_positives`` stories is an error, found
before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

MIN_POSITIVES = 4
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_CONCEPT = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class CorpusError(ValueError):
    """A corpus the trainer cannot use; the message names the files."""


def read_stories(path: Path) -> list[str]:
    """The stories of one file: blank-line separated, whitespace trimmed."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [s.strip() for s in _BLANK_LINE.split(text) if s.strip()]


@dataclass
class Corpus:
    positives: dict[str, list[str]]  # concept -> its stories, in file order
    baselines: list[str] = field(default_factory=list)
    neutral: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def concepts(self) -> list[str]:
        return sorted(self.positives)

    def texts(self) -> list[str]:
        """Every unique text once (one forward pass each), positives first."""
        seen: dict[str, None] = {}
        for concept in self.concepts:
            seen.update(dict.fromkeys(self.positives[concept]))
        seen.update(dict.fromkeys(self.baselines))
        seen.update(dict.fromkeys(self.neutral))
        return list(seen)

    def negatives(self, concept: str) -> list[str]:
        """Other concepts' positives, the baselines and the neutral texts (never the concept's own)."""
        own = set(self.positives[concept])
        others = [t for c in self.concepts if c != concept for t in self.positives[c]]
        return list(dict.fromkeys(t for t in others + self.baselines + self.neutral if t not in own))


def read_corpus(root: str | Path, min_positives: int = MIN_POSITIVES) -> Corpus:
    """Read a corpus directory; raises CorpusError (before any model work) when it cannot be used."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: not a directory")
    positives: dict[str, list[str]] = {}
    corpus = Corpus(positives)

    def take(path: Path) -> list[str]:
        stories = read_stories(path)
        if not stories:
            corpus.warnings.append(f"{path}: empty, skipped")
        return stories

    def add(concept: str, path: Path) -> None:
        if not _CONCEPT.match(concept):
            raise CorpusError(f"{path}: {concept!r} is not a concept name (lowercase letters, digits, '_' or '-')")
        positives.setdefault(concept, []).extend(take(path))

    for path in sorted(root.glob("*.txt")):
        add(path.stem, path)
    paired = root / "paired"
    for scenario in sorted(p for p in paired.glob("*") if p.is_dir()) if paired.is_dir() else []:
        if not (scenario / "baseline.txt").is_file():
            raise CorpusError(f"{scenario}: a paired scenario needs a baseline.txt")
        for path in sorted(scenario.glob("*.txt")):
            if path.stem == "baseline":
                corpus.baselines.extend(take(path))
            else:
                add(path.stem, path)
    direct = root / "direct"
    for path in sorted(direct.glob("*.txt")) if direct.is_dir() else []:
        if path.stem.startswith("_"):
            corpus.neutral.extend(take(path))
        else:
            add(path.stem, path)
    for concept in [c for c, stories in positives.items() if not stories]:
        del positives[concept]  # only empty files: already warned about
    if len(positives) < 2:
        raise CorpusError(f"{root}: found {len(positives)} concept(s) with stories; the trainer needs at least 2")
    few = {c: len(s) for c, s in positives.items() if len(s) < min_positives}
    if few:
        listed = ", ".join(f"{c} ({n})" for c, n in sorted(few.items()))
        raise CorpusError(f"{root}: fewer than {min_positives} stories for: {listed}")
    return corpus
