"""Policy-gradient training (``mode: rl``): completions the server sampled, the ledger has
not seen, trained in place with the server's one optimizer (``training.rl``). The job's flow
is SFT's (``kinds/sft.py``), with the samples' age checked as the job is queued and again as
it starts (``max_staleness``), and with ``reward_heads`` the rewards scored by the live reward
heads before the model is held for the steps."""

from __future__ import annotations

from dataclasses import replace

from hogwild.contracts.jobs import SubmitRLOp
from hogwild.contracts.protocol import OpError
from hogwild.training.rl import Completion, RLTrainer

from .base import Admission, RankTrainer, Services
from .sft import SFT


def _named(indices: list[int], samples) -> str:
    shown = [f"samples[{i}]" + (f" (id {samples[i].id!r})" if samples[i].id else "") for i in indices[:5]]
    return ", ".join(shown) + (f" and {len(indices) - 5} more" if len(indices) > 5 else "")


def staleness_problem(samples, current: int, max_staleness: int | None) -> str | None:
    """Why these samples may not be trained at weights version ``current``; None if they may."""
    if max_staleness is None:
        return None
    unversioned = [i for i, s in enumerate(samples) if s.weights_version is None]
    if unversioned:
        return (f"max_staleness needs each sample's weights_version (the X-Hogwild-Weights-Version its completion was "
                f"answered with); missing on {_named(unversioned, samples)}")
    ahead = [i for i, s in enumerate(samples) if s.weights_version > current]
    if ahead:
        return (f"{_named(ahead, samples)}: weights_version is ahead of the served weights' version {current} "
                "(sampled from another server?)")
    stale = [i for i, s in enumerate(samples) if current - s.weights_version > max_staleness]
    if stale:
        oldest = min(samples[i].weights_version for i in stale)
        return (f"{_named(stale, samples)}: drawn more than max_staleness={max_staleness} weight versions ago (the "
                f"served weights are at version {current}; the oldest sample is from version {oldest})")
    return None


# Measured (DESIGN.md, RL training): under full-weight RL the heads' scores of the same old
# completions rise as much as those of the new ones.
TRUNK_UNDER_HEADS = ("reward_heads on the full weights: the job moves the trunk the heads read, so their scores "
                     "can rise without better completions; train an adapter (\"adapter\") to keep the heads on the "
                     "frozen base")


class RL(SFT):
    request = SubmitRLOp
    noun = "sample"
    # Every rank runs the same job: the advantages come from the request (rewards or advantages),
    # the loss needs only the sampled tokens' log-probs, which the vocab-parallel ``token_nll`` gives.
    tensor_parallel = True

    def admit(self, service: Services, op: SubmitRLOp) -> Admission:
        problem = staleness_problem(op.samples, service.weights_version, op.options.max_staleness)
        if problem:
            raise OpError("invalid", problem)
        if op.options.reward_heads is not None:
            if service.tensor_parallel_size > 1:
                raise OpError("unsupported", "reward_heads with tensor parallel size "
                              f"{service.tensor_parallel_size} is not supported yet (the heads score on one rank)")
            names = service.heads.heads.names if service.heads.heads is not None else []
            unknown = [h for h in op.options.reward_heads if h not in names]
            if unknown:
                raise OpError("invalid", f"reward_heads: no head {unknown[0]!r} on this server " + (
                    f"(its heads: {names})" if names else "(no reward heads trained yet: POST /train with mode btrm)"))
        admission = super().admit(service, op)
        if op.options.reward_heads is not None and op.adapter is None:
            admission.warnings.append(TRUNK_UNDER_HEADS)
        return admission

    def run(self, service: Services, job):
        # Jobs queued ahead of this one may have moved the weights on since it was admitted.
        problem = staleness_problem(job.op.samples, service.weights_version, job.op.options.max_staleness)
        if problem:
            return "failed", f"nothing trained: while the job was queued, {problem}"
        return super().run(service, job)

    def prepare(self, service: Services, op: SubmitRLOp, chosen) -> list[Completion]:
        items = self.items(chosen)
        if op.options.reward_heads is None:
            return items
        weights = op.options.reward_heads
        rows = service.heads.score_last_tokens(service.access, [[*c.context_ids, *c.completion_ids] for c in items],
                                               list(weights))
        return [replace(c, reward=sum(w * row[head] for head, w in weights.items()), head_scores=row)
                for c, row in zip(items, rows)]

    def items(self, samples) -> list[Completion]:
        return [Completion(tuple(s.context_ids), tuple(s.completion_ids), tuple(s.logprobs), s.reward, s.group, s.advantage,
                           s.id) for s in samples]

    def train(self, rank: RankTrainer, items: list[Completion], options, **callbacks):
        return RLTrainer(rank.trainer).run(items, options, **callbacks)


KIND = RL()
