"""Policy-gradient training (``mode: rl``): completions the server sampled, the ledger has
not seen, trained in place with the server's one optimizer (``training.rl``). The job's flow
is SFT's (``kinds/sft.py``)."""

from __future__ import annotations

from hogwild.contracts.jobs import SubmitRLOp
from hogwild.training.rl import Completion, RLTrainer

from .base import RankTrainer
from .sft import SFT


class RL(SFT):
    request = SubmitRLOp
    noun = "sample"
    # Not yet run under tensor parallelism (its loss needs only the sampled tokens' log-probs,
    # which the vocab-parallel ``token_nll`` gives): refused there until a test shows it.
    tensor_parallel = False

    def items(self, samples) -> list[Completion]:
        return [Completion(tuple(s.context_ids), tuple(s.completion_ids), tuple(s.logprobs), s.reward, s.group, s.advantage,
                           s.id) for s in samples]

    def train(self, rank: RankTrainer, items: list[Completion], options, **callbacks):
        return RLTrainer(rank.trainer).run(items, options, **callbacks)


KIND = RL()
