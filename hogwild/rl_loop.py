"""Online RL against a running server, from the client's side: sample completions of the
prompts from the served model, reward them, post them as one RL job, repeat. The job trains
the very weights that sample the next iteration, so there is no weight sync between the two.

    client = HogwildClient(url, admin_key=...)
    history = rl_loop(client, prompts, TokenBandReward(800, 1000), group_size=8, iterations=20,
                      on_iteration=print_line)

Each iteration's line says the mean reward, the KL the job moved the policy by, and the gap
between the trainer's log-probs and the engine's on the sampled tokens before the first step
(what the importance weight corrects: numerics and the weights moving while sampling).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .client import HogwildClient, SampledCompletion

Reward = Callable[[list[int], list[int]], float]  # (prompt ids, completion ids) -> reward


@dataclass(frozen=True)
class TokenBandReward:
    """A verifiable reward: the fraction of a completion's tokens in ``[low, high)`` (a band
    of the vocabulary). A model that samples the vocabulary evenly scores the band's share."""

    low: int
    high: int

    def __call__(self, prompt_ids: list[int], completion_ids: list[int]) -> float:
        if not completion_ids:
            return 0.0
        return sum(self.low <= t < self.high for t in completion_ids) / len(completion_ids)


@dataclass
class RLIteration:
    """What one iteration did, from the samples and the job's result."""

    iteration: int
    mean_reward: float
    samples: int
    weights_version: int | None  # the weights that sampled this iteration
    job_id: str | None = None
    state: str | None = None
    error: str | None = None
    kl: float | None = None  # to the weights as the job started, after its last step
    ratio_mean: float | None = None
    logprob_gap_mean: float | None = None  # trainer (as the job started) vs engine on the sampled tokens
    logprob_gap_max: float | None = None
    steps: int = 0  # optimizer steps the job applied: the weights' version rose by as many
    zero_advantage_groups: int = 0
    sample_seconds: float = 0.0
    train_seconds: float = 0.0
    rewards: list[float] = field(default_factory=list)

    def line(self, total: int) -> str:
        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"

        return (f"iteration {self.iteration + 1}/{total}  reward {self.mean_reward:.3f}  kl {num(self.kl, '.2e')}  "
                f"gap {num(self.logprob_gap_mean, '.1e')} (max {num(self.logprob_gap_max, '.1e')})  "
                f"version {num(self.weights_version, 'd')}  sample {self.sample_seconds:.1f} s  "
                f"train {self.train_seconds:.1f} s  {self.state}" + (f": {self.error}" if self.error else ""))


def rl_samples(groups: Sequence[Sequence[SampledCompletion]], rewards: Sequence[Sequence[float]] | None,
               group_names: Sequence[str]) -> list[dict]:
    """``/train`` (mode rl) samples: each completion with its reward (None: the job's
    ``reward_heads`` give them), group and weights' version; empty completions are left out
    (nothing to train)."""
    samples = []
    for k, (name, group) in enumerate(zip(group_names, groups)):
        for j, c in enumerate(group):
            if not c.completion_ids:
                continue
            sample = {"context_ids": c.prompt_ids, "completion_ids": c.completion_ids, "logprobs": c.logprobs, "group": name}
            if rewards is not None:
                sample["reward"] = rewards[k][j]
            if c.weights_version is not None:
                sample["weights_version"] = c.weights_version
            samples.append(sample)
    return samples


def rl_loop(client: HogwildClient, prompts: Sequence[list[int]], reward: Reward | None, group_size: int, iterations: int,
            max_tokens: int = 16, temperature: float = 1.0, objective: str = "grpo",
            on_iteration: Callable[[RLIteration], None] | None = None, **options) -> list[RLIteration]:
    """``iterations`` rounds of: ``group_size`` completions per prompt, rewarded, one RL job
    (``options``: any RL or optimizer setting of ``/train``), waited for. ``reward`` None: the
    job's ``reward_heads`` option scores the completions on the server, and the iteration's
    rewards are the ones the job reports. A failed job is
    reported in its iteration and the loop goes on with the next. Sampling is not seeded: one
    seed per request would draw every prompt's completions from the same random numbers, and
    the groups would explore far less. With ``adapter`` among the options the completions are the
    adapter's (the base's until its first job creates it: a new adapter starts as the base)."""
    history = []
    adapter = options.get("adapter")
    for it in range(iterations):
        started = time.perf_counter()
        model = adapter if adapter is not None and adapter in client.adapters() else None
        groups = client.complete(list(prompts), n=group_size, max_tokens=max_tokens, temperature=temperature, model=model)
        rewards = [[reward(c.prompt_ids, c.completion_ids) for c in group] for group in groups] if reward is not None else None
        sampled = time.perf_counter()
        flat = [r for group in rewards for r in group] if rewards else []
        record = RLIteration(it, sum(flat) / max(len(flat), 1), sum(len(g) for g in groups),
                             groups[0][0].weights_version if groups[0] else None, sample_seconds=sampled - started,
                             rewards=flat)
        samples = rl_samples(groups, rewards, [f"{it}:{i}" for i in range(len(groups))])
        if samples:
            job = client.train_rl(samples, objective=objective, wait=True, **options)
            result = job.get("result") or {}
            history_rows = result.get("history") or []
            before = result.get("before") or {}
            record.job_id, record.state, record.error = job.get("job_id"), job.get("state"), job.get("error")
            record.kl = history_rows[-1].get("kl") if history_rows else None
            record.ratio_mean = history_rows[-1].get("ratio_mean") if history_rows else None
            # Each step's gap is |job start - engine| on its batch: together, every trained sample.
            gaps = [row for row in history_rows if row.get("logprob_gap_max") is not None] or [before]
            if gaps[0].get("logprob_gap_max") is not None:
                record.logprob_gap_mean = sum(row["logprob_gap_mean"] for row in gaps) / len(gaps)
                record.logprob_gap_max = max(row["logprob_gap_max"] for row in gaps)
            record.steps = result.get("steps") or 0
            if rewards is None and result.get("rewards"):  # scored by the reward heads on the server
                record.rewards = result["rewards"]
                record.mean_reward = sum(record.rewards) / len(record.rewards)
            record.zero_advantage_groups = len(result.get("zero_advantage_groups") or [])
        record.train_seconds = time.perf_counter() - sampled
        history.append(record)
        if on_iteration is not None:
            on_iteration(record)
    return history
