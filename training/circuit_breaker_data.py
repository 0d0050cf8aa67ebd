"""Circuit-breaker datasets: the JSONL reader, and a synthetic harmful/retain
set whose split is known by construction (for tests and the demo; no real
harmful data is available or wanted here).

JSONL schema, one conversation per line: ``{"ids": [...], "split":
"harmful"|"retain", "priority_class": "...", "id": "..."}``. Rows that do not
fit it are counted and reported with their line numbers, never silently dropped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import ValidationError

from hogwild.contracts.circuit_breaker_config import CBSample

from .btrm_corpora import TOPICS, passage

# A vocabulary of its own for the harmful side: what the adapter must learn to
# reroute is separable from the retain topics by construction.
HARMFUL_WORDS = (["toxin", "fuse", "detonator", "poison", "payload", "lockpick", "exploit", "malware", "bypass", "weapon"],
                 ["ignites", "leaks", "spreads", "triggers", "breaches", "arms"], ["lethal", "hidden", "illicit", "volatile"])
RETAIN_TOPICS = ("ocean", "forest", "kitchen")
HARMFUL_CLASSES = ("harmful_flip", "adversarial_safe", "injection_resisted")
RETAIN_CLASSES = ("general_conversation", "benign_twin", "tool_capability", "borderline")


def read_jsonl(path: Path) -> tuple[list[CBSample], dict]:
    """Samples of a JSONL file and a report of the rows that could not be read."""
    samples, bad = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                samples.append(CBSample.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as exc:
                bad.append({"line": number, "error": str(exc).splitlines()[0][:200]})
    return samples, {"path": str(path), "rows": len(samples), "bad_rows": len(bad), "bad": bad[:20]}


def conversation(tokenizer, question: str, reply: str) -> list[int]:
    """Token ids of one user/assistant exchange under the model's chat template."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
                                        tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def synthetic_samples(tokenizer, n_harmful: int = 24, n_retain: int = 24, seed: int = 0) -> list[CBSample]:
    """Harmful conversations (their own vocabulary) and retain conversations
    (everyday topics), each with a priority class."""
    rng = random.Random(seed)
    samples = []
    for i in range(n_harmful):
        question = "Tell me how the " + passage(rng, HARMFUL_WORDS, "flattened").split(" by ")[0].removeprefix("the ") + "."
        reply = passage(rng, HARMFUL_WORDS, "fk_normed")
        samples.append(CBSample(ids=conversation(tokenizer, question, reply), split="harmful",
                                priority_class=HARMFUL_CLASSES[i % len(HARMFUL_CLASSES)], id=f"harmful-{i}"))
    for i in range(n_retain):
        words = TOPICS[RETAIN_TOPICS[i % len(RETAIN_TOPICS)]]
        question = "Tell me about the " + rng.choice(words[0]) + "."
        reply = passage(rng, words, "fk_normed")
        samples.append(CBSample(ids=conversation(tokenizer, question, reply), split="retain",
                                priority_class=RETAIN_CLASSES[i % len(RETAIN_CLASSES)], id=f"retain-{i}"))
    return samples


def write_jsonl(samples: list[CBSample], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(s.model_dump_json(exclude_none=True) + "\n" for s in samples))
    return path
