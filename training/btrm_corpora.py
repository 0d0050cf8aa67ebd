"""Synthetic BTRM corpora whose structure is known by construction.

The owner's real corpora are not available here. These stand in for them in
tests and the demo: four topical corpora (each its own vocabulary), each in
three tiers written differently (``flattened``: lowercase, unpunctuated, in
field ``text``; ``fk_normed``: plain prose in ``prose``; ``brainrot_aesop_v1``:
a fable with a moral, in ``prose``), plus external-style negatives (field
``content``, a neutral vocabulary, and two unreadable rows to show the decoders
reporting them). ``write_corpora`` also writes a config with heads that each
carve the same texts differently: one per topic, one for the fable style
across topics, one for a topic's plain-prose tier only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "ocean": (["wave", "tide", "reef", "gull", "harbour", "current", "shell", "sailor", "kelp", "lighthouse"],
              ["rolls", "crashes", "drifts", "glitters", "foams", "swells"], ["salty", "deep", "blue", "windswept"]),
    "forest": (["oak", "moss", "fern", "owl", "pine", "squirrel", "trail", "mushroom", "bark", "clearing"],
               ["rustles", "grows", "creaks", "shades", "whispers", "sprouts"], ["green", "damp", "ancient", "leafy"]),
    "machines": (["gear", "piston", "motor", "circuit", "lever", "valve", "turbine", "bolt", "sensor", "engine"],
                 ["hums", "grinds", "clicks", "spins", "sparks", "rattles"], ["steel", "oiled", "humming", "precise"]),
    "kitchen": (["kettle", "spoon", "bread", "onion", "oven", "skillet", "pantry", "garlic", "dough", "saucepan"],
                ["simmers", "bakes", "sizzles", "steams", "rises", "boils"], ["warm", "crusty", "fragrant", "buttery"]),
}
NEUTRAL = (["report", "meeting", "schedule", "number", "office", "update", "page", "item", "list", "note"],
           ["is", "was", "remains", "follows", "appears", "lists"], ["general", "routine", "standard", "brief"])
TIERS = ("flattened", "fk_normed", "brainrot_aesop_v1")


def _sentence(rng: random.Random, words) -> str:
    nouns, verbs, adjectives = words
    return f"the {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} by the {rng.choice(nouns)}"


def passage(rng: random.Random, words, tier: str) -> str:
    sentences = [_sentence(rng, words) for _ in range(rng.randint(2, 3))]
    if tier == "flattened":
        return " ".join(sentences)
    prose = " ".join(s[0].upper() + s[1:] + "." for s in sentences)
    if tier == "fk_normed":
        return prose
    moral = _sentence(rng, words)
    return f"Once upon a time, {prose[0].lower() + prose[1:]} And so the fable teaches: {moral}, always."


def write_corpora(out: Path, per_tier: int = 60, seed: int = 0) -> Path:
    """Write the corpora and ``config.yaml`` into ``out``; returns the config's path."""
    import yaml

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    for topic, words in TOPICS.items():
        with open(out / f"{topic}.jsonl", "w") as f:
            for tier in TIERS:
                for i in range(per_tier):
                    field = "text" if tier == "flattened" else "prose"
                    f.write(json.dumps({"id": f"{topic}-{tier}-{i}", "tier": tier, field: passage(rng, words, tier)}) + "\n")
    with open(out / "external.jsonl", "w") as f:
        for i in range(per_tier * 2):
            f.write(json.dumps({"id": f"ext-{i}", "content": passage(rng, NEUTRAL, "fk_normed")}) + "\n")
        f.write("{this line is not json\n")
        f.write(json.dumps({"id": "ext-empty", "content": ""}) + "\n")

    topics = list(TOPICS)
    heads = []
    for topic in topics:
        others = [t for t in topics if t != topic]
        heads.append({
            "name": topic, "description": f"passages about {topic}, in any style",
            "positive_sources": [{"path": f"{topic}.jsonl"}],
            "negative_sources": [{"path": f"{others[0]}.jsonl", "neg_tier": "soft_neg"}]
                                + [{"path": f"{o}.jsonl", "neg_tier": "semi_firm_neg"} for o in others[1:]],
        })
    heads.append({
        "name": "fable", "description": "fable-style passages (with a moral), on any topic",
        "positive_sources": [{"path": f"{t}.jsonl", "tier_filter": ["brainrot_aesop_v1"]} for t in topics],
        "negative_sources": [{"path": f"{t}.jsonl", "tier_filter": ["flattened", "fk_normed"], "neg_tier": "soft_neg"}
                             for t in topics],
    })
    heads.append({
        "name": "ocean_prose", "description": "plain prose about the ocean (not flattened, not a fable)",
        "positive_sources": [{"path": "ocean.jsonl", "tier_filter": ["fk_normed"]}],
        "negative_sources": [{"path": "ocean.jsonl", "tier_filter": ["flattened", "brainrot_aesop_v1"], "neg_tier": "soft_neg"}]
                            + [{"path": f"{t}.jsonl", "tier_filter": ["fk_normed"], "neg_tier": "semi_firm_neg"} for t in topics[1:]],
    })
    config = {"heads": heads, "shared_negatives": [{"path": "external.jsonl", "neg_tier": "furthest_neg"}]}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
