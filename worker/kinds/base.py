"""What a training mode is to the trainer: how a request of its kind is admitted, what
memory it will need, and how it runs. One module per mode implements it (the registry
is ``kinds/__init__.py``); the service does everything the modes share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from hogwild.contracts.jobs import JobRequestBase

if TYPE_CHECKING:
    from hogwild.training.memory import JobMemory

    from ..jobs import Job
    from ..service import TrainerService

Outcome = tuple[str, "str | None"]  # (final state, error)


@dataclass
class Admission:
    """What the trainer tells the caller when it queues a job."""

    n_samples: int
    skipped_ids: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class JobKind:
    """A training mode: the request class it serves (its contract entry) and three steps.

    ``admit`` runs when the request arrives (on the transport thread: cheap checks only;
    raise ``OpError`` to refuse with a reason), ``estimate`` before admission and again
    when the job starts (None: nothing worth checking), ``run`` on the job thread; it
    returns the final state and error, and leaves its numbers in ``job.info.result``.
    Whatever ``run`` raises fails the job with the exception's type and message: the
    service's one guard (``TrainerService._run``), so a kind has no guard of its own.
    """

    request: ClassVar[type[JobRequestBase]]
    tensor_parallel: ClassVar[bool] = False  # runs on every tensor-parallel rank (``TrainerService.train_on_ranks``)

    def admit(self, service: TrainerService, op) -> Admission:
        return Admission(n_samples=op.sample_count())

    def estimate(self, service: TrainerService, op) -> JobMemory | None:
        return None

    def run(self, service: TrainerService, job: Job) -> Outcome:
        raise NotImplementedError
