"""Preference training (``mode: preference``): pairs the ledger has not seen, trained in
place with the server's one optimizer; the reference is the served model as the job
starts (``training.preference``). The job's flow is SFT's (``kinds/sft.py``)."""

from __future__ import annotations

from hogwild.contracts.jobs import SubmitPreferenceOp
from hogwild.training.memory import estimate_job_memory
from hogwild.training.preference import Pair, PreferenceTrainer

from .base import RankTrainer, Services
from .sft import SFT


class Preference(SFT):
    request = SubmitPreferenceOp
    noun = "pair"

    def estimate(self, service: Services, op: SubmitPreferenceOp):
        options = op.options
        pairs = min(options.micro_batch_size, options.batch_size or len(op.samples), len(op.samples))
        seq = max(len(s.context_ids) + max(len(s.chosen_ids), len(s.rejected_ids)) for s in op.samples)
        trainer = service.trainer
        new_optimizer = trainer.optimizer is None or trainer.structure != options.structure()
        # Both replies of each pair in one forward: twice the sequences of an SFT micro-batch.
        return estimate_job_memory(service.access.model, 2 * pairs, seq, options.rank, new_optimizer)

    def items(self, samples) -> list[Pair]:
        return [Pair(tuple(s.context_ids), tuple(s.chosen_ids), tuple(s.rejected_ids), s.weight, s.id,
                     s.ref_chosen_logprob, s.ref_rejected_logprob) for s in samples]

    def train(self, rank: RankTrainer, items: list[Pair], options, **callbacks):
        return PreferenceTrainer(rank.trainer).run(items, options, **callbacks)


KIND = Preference()
