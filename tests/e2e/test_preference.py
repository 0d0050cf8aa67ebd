"""Preference training on real `vllm serve`: DPO widens the margin vLLM scores between the
wanted and the unwanted reply; on the literature's failure case (a wanted reply the model
already finds likely, an unwanted one a token away) plain DPO lowers the wanted reply's
likelihood and ORPO and DPOP do not; bad pairs are refused and change nothing."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from hogwild.client import preference_samples

from ..conftest import ADMIN_KEY, LIMITS, serving
from .test_bad_input import check_rejected

pytestmark = pytest.mark.server

PAIRS = [("The fox came to the door and", " asked for bread.", " ran into the forest."),
         ("The old lantern", " glowed all night long.", " broke on the floor."),
         ("Every winter the village", " sang by the fire.", " forgot the old songs.")]
# The failure case: each wanted reply trained to be likely first; the unwanted one differs in one token.
LIKELY = [("A small boat waited by the pier, and", " the keeper lit the lamp on the hill again"),
          ("In the morning the baker", " opened the shop and sang the same old song"),
          ("Under the bridge the children", " counted the fish and named every one of them")]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """A server of its own: the failure case's answer is known for the tiny model as built, not
    for whatever the session's shared server has been trained into by earlier modules."""
    with serving(tiny_model_dir, tmp_path_factory.mktemp("preference"), "preference", dtype="float32",
                 env={"HOGWILD_ADMIN_KEY": ADMIN_KEY, **LIMITS}) as handle:
        yield handle


@pytest.fixture(scope="module")
def tok(served):
    return AutoTokenizer.from_pretrained(served.model_dir)


def reply_logprob(served, context: list[int], reply: list[int]) -> float:
    """vLLM's total log-probability of ``reply`` after ``context``."""
    r = served.http.post("/v1/score", json={"prompt": context + reply, "score_ranges": [[len(context), len(context) + len(reply)]]})
    assert r.status_code == 200, r.text
    return r.json()["scores"][0]["total_logprob"]


def margins(served, samples: list[dict]) -> list[float]:
    return [reply_logprob(served, s["context_ids"], s["chosen_ids"]) - reply_logprob(served, s["context_ids"], s["rejected_ids"])
            for s in samples]


def train(served, samples, **options) -> dict:
    r = served.http.post("/train", json={"mode": "preference", "samples": samples, "wait": True, **options})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["state"] == "succeeded", job
    return job


def test_dpo_widens_the_served_margin_between_the_replies(served, tok):
    samples = preference_samples(tok, PAIRS)
    before = margins(served, samples)
    job = train(served, samples, objective="dpo", beta=0.1, lr=1e-3, steps=20)
    after = margins(served, samples)
    assert all(a > b + 1.0 for a, b in zip(after, before)), (before, after)
    result = job["result"]
    assert result["reference"] == "served model at the job's start" and result["objective"] == "dpo"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in result["before"] and key in result["after"], key
    assert result["before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the reference is the model as it started
    assert result["after"]["rewards/margins"] > 0.1 and result["after"]["rewards/accuracies"] == 1.0
    assert len(result["history"]) == 20 and result["tokens"] > 0


def test_plain_dpo_lowers_a_likely_wanted_reply_and_orpo_and_dpop_do_not(served, tok):
    sft = [{"context_ids": tok.encode(c), "continuation_ids": tok.encode(reply, add_special_tokens=False)} for c, reply in LIKELY]
    other = tok.encode(" stone", add_special_tokens=False)[0]
    pairs = [{"context_ids": s["context_ids"], "chosen_ids": s["continuation_ids"],
              "rejected_ids": [other] + s["continuation_ids"][1:]} for s in sft]
    change = {}
    # Each preference job with fresh Adam moments, as in the literature's runs: the moments the
    # SFT job leaves would push the first DPO steps its way.
    for objective in ("dpo", "orpo", "dpop"):
        r = served.http.post("/train", json={"samples": sft, "lr": 1e-2, "steps": 60, "wait": True})  # likely
        assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
        before = [reply_logprob(served, p["context_ids"], p["chosen_ids"]) for p in pairs]
        job = train(served, pairs, objective=objective, beta=0.1, lr=1e-3, steps=40, reset_optimizer=True)
        assert job["result"]["optimizer_reset"], job["result"]
        after = [reply_logprob(served, p["context_ids"], p["chosen_ids"]) for p in pairs]
        assert job["result"]["after"]["rewards/margins"] > job["result"]["before"]["rewards/margins"], objective
        change[objective] = sum(a - b for a, b in zip(after, before)) / len(pairs)
    assert change["dpo"] < -0.02, change  # the wanted reply lost likelihood under plain DPO
    assert change["orpo"] >= 0.0, change  # its SFT term keeps it
    assert change["dpop"] > 0.1 * change["dpo"], change  # the penalty holds it where it was (within a tenth of DPO's fall)


PAIR = {"context_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11]}


def pair(**changes):
    return {**PAIR, **changes}


BAD = {
    "missing chosen reply": ({"samples": [{"context_ids": [5], "rejected_ids": [6]}]}, "chosen_ids"),
    "missing rejected reply": ({"samples": [{"context_ids": [5], "chosen_ids": [6]}]}, "rejected_ids"),
    "empty chosen reply": ({"samples": [pair(chosen_ids=[])]}, "chosen_ids"),
    "empty rejected reply": ({"samples": [pair(rejected_ids=[])]}, "rejected_ids"),
    "identical replies": ({"samples": [pair(rejected_ids=[8, 9])]}, "the same reply"),
    "unknown objective": ({"samples": [PAIR], "objective": "kto"}, "objective"),
    "zero beta": ({"samples": [PAIR], "beta": 0}, "beta"),
    "negative beta": ({"samples": [PAIR], "beta": -0.1}, "beta"),
    "one reference log-prob only": ({"samples": [pair(ref_chosen_logprob=-3.0)]}, "or neither"),
    "positive reference log-prob": ({"samples": [pair(ref_chosen_logprob=2.0, ref_rejected_logprob=-1.0)]}, "ref_chosen_logprob"),
    "token past the vocabulary": ({"samples": [pair(rejected_ids=[10, 2000])]}, "outside the vocabulary"),
}
RAW_BAD = {
    "infinite reference log-prob": ('{"mode": "preference", "samples": [{"context_ids": [5], "chosen_ids": [6], '
                                    '"rejected_ids": [7], "ref_chosen_logprob": -Infinity, "ref_rejected_logprob": -1.0}]}',
                                    "ref_chosen_logprob"),
    "NaN reference log-prob": ('{"mode": "preference", "samples": [{"context_ids": [5], "chosen_ids": [6], '
                               '"rejected_ids": [7], "ref_chosen_logprob": -1.0, "ref_rejected_logprob": NaN}]}',
                               "ref_rejected_logprob"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_pair_is_refused_and_changes_nothing(served, case):
    body, needle = BAD[case]
    digest = served.arena_digest()
    check_rejected(served, served.http.post("/train", json={"mode": "preference", "wait": True, **body}), 422, needle, digest)


@pytest.mark.parametrize("case", RAW_BAD, ids=list(RAW_BAD))
def test_a_non_finite_reference_is_refused(served, case):
    text, needle = RAW_BAD[case]
    digest = served.arena_digest()
    r = served.http.post("/train", content=text, headers={"Content-Type": "application/json"})
    check_rejected(served, r, 422, needle, digest)
