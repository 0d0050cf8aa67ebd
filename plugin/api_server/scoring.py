"""``/v1/score``: log-likelihood of prompt ranges, computed by vLLM's engine."""

from __future__ import annotations

import secrets


async def prompt_token_logprobs(engine_client, prompt: list[int]) -> list[float | None]:
    """log P(prompt[p] | prompt[:p]) for every position (None at p = 0).

    One engine request with ``prompt_logprobs=0`` (each prompt token's own
    logprob); such requests skip reading the prefix cache, so every position is
    computed with the weights the engine holds now.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    final = None
    async for output in engine_client.generate(TokensPrompt(prompt_token_ids=prompt), params, f"hogwild-score-{secrets.token_hex(8)}"):
        final = output
    positions = final.prompt_logprobs
    return [None] + [positions[p][prompt[p]].logprob for p in range(1, len(prompt))]


def range_totals(logprobs: list[float | None], ranges: list[list[int]]) -> list[dict]:
    """Sum of per-position logprobs over each half-open range (position 0 has none)."""
    scores = []
    for index, (start, end) in enumerate(ranges):
        picked = [logprobs[p] for p in range(max(start, 1), end)]
        scores.append({"range_index": index, "total_logprob": float(sum(picked)), "n_tokens": len(picked)})
    return scores
