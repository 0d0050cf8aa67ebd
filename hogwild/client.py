"""A small Python client for the plugin's routes, with the tokenizer-backed
helper that turns texts into the token ids the server takes.

    client = HogwildClient("http://127.0.0.1:8000", api_key="...", admin_key="...")
    client.train([{"context_ids": [...], "continuation_ids": [...]}], lr=1e-5, wait=True)
    samples = btrm_samples(tokenizer, config, texts, labels)   # wrapped in the meta-prompt
    client.train_btrm(config, samples, wait=True)
    pairs = preference_samples(tokenizer, [(context, chosen, rejected)])
    client.train_preference(pairs, objective="orpo", lr=1e-5, wait=True)
    client.score(prompt_ids, [[0, len(prompt_ids)]], heads=True)
    groups = client.complete([prompt_ids], n=8, max_tokens=16)        # token ids, log-probs, weights version
    client.train_rl(samples, objective="grpo", wait=True)             # samples: see hogwild.rl_loop
    client.run_rl(prompt_id_lists, reward_fn, group_size=8, iterations=20, lr=3e-3)   # the whole loop
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import httpx

from hogwild.contracts.btrm_config import BTRMConfig
from hogwild.contracts.jobs import IDEMPOTENCY_KEY_HEADER
from hogwild.contracts.weights_version import HEADER as WEIGHTS_VERSION_HEADER


def btrm_samples(tokenizer, config: BTRMConfig, texts: list[str], labels: list[dict[str, str]]) -> list[dict]:
    """``/train`` (mode btrm) samples: each text wrapped in the config's
    meta-prompt, tokenized, cut from the left to ``max_length``; ``labels`` maps
    head -> "positive" or a negative tier, per text."""
    return [{"ids": tokenizer.encode(config.wrap(t), add_special_tokens=False)[-config.max_length :], "labels": lab}
            for t, lab in zip(texts, labels)]


def preference_samples(tokenizer, triples: list[tuple[str, str, str]], ids: list[str] | None = None) -> list[dict]:
    """``/train`` (mode preference) samples from (context, chosen reply, rejected reply)
    texts: the context tokenized as the tokenizer does by default (its special tokens, a
    chat template already applied by the caller if wanted), each reply without special
    tokens, so the replies are exactly the tokens the model is trained to prefer."""
    samples = []
    for i, (context, chosen, rejected) in enumerate(triples):
        sample = {"context_ids": tokenizer.encode(context),
                  "chosen_ids": tokenizer.encode(chosen, add_special_tokens=False),
                  "rejected_ids": tokenizer.encode(rejected, add_special_tokens=False)}
        if ids is not None:
            sample["id"] = ids[i]
        samples.append(sample)
    return samples


def wrapped_prompt(tokenizer, config: BTRMConfig, text: str) -> list[int]:
    """A text as the heads saw it in training: score it with the range ending at the last token."""
    return tokenizer.encode(config.wrap(text), add_special_tokens=False)[-config.max_length :]


@dataclass(frozen=True)
class SampledCompletion:
    """One completion the server sampled: its tokens, the engine's log-probability of each
    (of the model's raw distribution: vLLM's default ``logprobs_mode``), and the weights'
    version it was sampled at (None from a server without the plugin's trainer)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    weights_version: int | None
    finish_reason: str | None = None


# A request whose connection dropped before any answer (a kept-alive connection the server
# closed as it was reused, a restart) is sent again this many times in all, a second apart.
ATTEMPTS = 3
RETRIED = (httpx.NetworkError, httpx.RemoteProtocolError)


class HogwildClient:
    """Every request is sent again when its connection drops before an answer: job requests
    carry an ``Idempotency-Key`` (one per call), so the server queues such a job once."""

    def __init__(self, base_url: str, api_key: str | None = None, admin_key: str | None = None, timeout: float = 600):
        headers = {}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        if admin_key:
            headers["X-Hogwild-Admin-Key"] = admin_key
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)
        self._model: str | None = None  # the served model's name, asked once

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(ATTEMPTS):
            try:
                return self.http.request(method, path, **kwargs)
            except RETRIED:
                if attempt == ATTEMPTS - 1:
                    raise
                time.sleep(1.0)

    def _post(self, path: str, body: dict) -> dict:
        headers = {IDEMPOTENCY_KEY_HEADER: uuid.uuid4().hex} if path.endswith("/train") else None
        r = self._send("POST", path, json=body, headers=headers)
        if r.status_code >= 400:
            raise RuntimeError(f"{path}: {r.status_code} {r.text}")
        return r.json()

    def train(self, samples: list[dict], **options) -> dict:
        return self._post("/v1/train", {"samples": samples, **options})

    def train_btrm(self, config: BTRMConfig | dict, samples: list[dict] | None = None, wait: bool = False) -> dict:
        body = {"mode": "btrm", "config": config.model_dump() if isinstance(config, BTRMConfig) else config, "wait": wait}
        if samples is not None:
            body["samples"] = samples
        return self._post("/v1/train", body)

    def train_preference(self, samples: list[dict], objective: str = "dpo", wait: bool = False, **options) -> dict:
        """A preference job (``objective``: dpo, ipo, dpop, orpo, simpo; ``beta`` and every
        optimizer setting as keyword arguments); the reference is the served model as it starts."""
        return self._post("/v1/train", {"mode": "preference", "samples": samples, "objective": objective, "wait": wait,
                                        **options})

    def score(self, prompt: list[int], score_ranges: list[list[int]], heads: bool | list[str] = False,
              model: str | None = None) -> list[dict]:
        """Each range's log-likelihood (under the served adapter ``model`` when given)."""
        body = {"prompt": prompt, "score_ranges": score_ranges, "heads": heads, **({"model": model} if model else {})}
        return self._post("/v1/score", body)["scores"]

    def adapters(self) -> list[str]:
        """The served adapters' names (``/v1/models`` after the base)."""
        r = self._send("GET", "/v1/models")
        r.raise_for_status()
        return [m["id"] for m in r.json()["data"][1:]]

    def delete_adapter(self, name: str) -> dict:
        """Forget a served adapter (its job's final state)."""
        r = self._send("DELETE", f"/v1/adapters/{name}")
        if r.status_code >= 400:
            raise RuntimeError(f"/v1/adapters/{name}: {r.status_code} {r.text}")
        return r.json()

    def model_name(self) -> str:
        """The served model's name (the first of ``/v1/models``)."""
        if self._model is None:
            r = self._send("GET", "/v1/models")
            r.raise_for_status()
            self._model = r.json()["data"][0]["id"]
        return self._model

    def complete(self, prompts: list[list[int]], n: int = 1, max_tokens: int = 16, temperature: float = 1.0,
                 seed: int | None = None, model: str | None = None, **sampling) -> list[list[SampledCompletion]]:
        """``n`` completions of each prompt (token ids), in one ``/v1/completions`` request (from the
        served adapter ``model`` when given): per prompt, its completions with their tokens, the
        engine's log-probs and the weights' version."""
        body = {"model": model or self.model_name(), "prompt": prompts, "n": n, "max_tokens": max_tokens,
                "temperature": temperature, "logprobs": 0, "return_token_ids": True, **sampling}
        if seed is not None:
            body["seed"] = seed
        r = self._send("POST", "/v1/completions", json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"/v1/completions: {r.status_code} {r.text}")
        version = r.headers.get(WEIGHTS_VERSION_HEADER)
        version = int(version) if version is not None else None
        groups: list[list[SampledCompletion]] = [[] for _ in prompts]
        for choice in sorted(r.json()["choices"], key=lambda c: c["index"]):
            i = choice["index"] // n
            groups[i].append(SampledCompletion(prompts[i], choice["token_ids"] or [],
                                               choice["logprobs"]["token_logprobs"] or [], version,
                                               choice.get("finish_reason")))
        return groups

    def train_rl(self, samples: list[dict], objective: str = "grpo", wait: bool = False, **options) -> dict:
        """An RL job (``objective``: grpo, cispo, reinforce; every RL and optimizer setting as
        keyword arguments); samples as ``hogwild.rl_loop.rl_samples`` makes them."""
        return self._post("/v1/train", {"mode": "rl", "samples": samples, "objective": objective, "wait": wait, **options})

    def run_rl(self, prompts: list[list[int]], reward, group_size: int, iterations: int, **options):
        """Online RL against this server: ``hogwild.rl_loop.rl_loop`` (sample, reward, train,
        repeat); ``reward(prompt_ids, completion_ids) -> float``, or None with ``reward_heads``."""
        from .rl_loop import rl_loop

        return rl_loop(self, prompts, reward, group_size, iterations, **options)

    def status(self) -> dict:
        return self._send("GET", "/v1/train/status").json()

    def checkpoint(self, target: str | None = None) -> dict:
        return self._post("/v1/checkpoint", {"target": target} if target else {})
