"""How old an RL job's samples may be: the served weights' version (contracts/weights_version.py),
shared by the trainer that writes it and the API server that stamps it on completions, and
``max_staleness`` judged against it when a job is queued and again when it starts
(worker/kinds/rl.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hogwild.contracts.jobs import RLSample, SubmitRLOp
from hogwild.contracts.protocol import OpError
from hogwild.contracts.rl_config import RLOptions
from hogwild.contracts.weights_version import WeightsVersionReader, WeightsVersionWriter
from hogwild.worker.kinds.rl import KIND as RL_KIND
from hogwild.worker.kinds.rl import staleness_problem


def rl_op(versions, max_staleness) -> SubmitRLOp:
    return SubmitRLOp(samples=[RLSample(context_ids=[5], completion_ids=[6], logprobs=[-1.0], advantage=1.0, id=f"s{i}",
                                        weights_version=v) for i, v in enumerate(versions)],
                      options=RLOptions(max_staleness=max_staleness))


@pytest.mark.parametrize("versions, max_staleness, needle", [
    ([8, 10], None, None),  # no bound: any age
    ([8, 10], 2, None),
    ([7, 10, 6], 2, "samples[0] (id 's0'), samples[2] (id 's2'): drawn more than max_staleness=2 weight versions ago "
                    "(the served weights are at version 10; the oldest sample is from version 6)"),
    ([10, None], 2, "missing on samples[1]"),
    ([11], 2, "samples[0] (id 's0'): weights_version is ahead"),
])
def test_staleness_is_judged_against_the_current_version(versions, max_staleness, needle):
    problem = staleness_problem(rl_op(versions, max_staleness).samples, 10, max_staleness)
    assert problem == needle if needle is None else needle in problem, problem


def test_a_job_that_went_stale_in_the_queue_fails_before_training():
    service = SimpleNamespace(weights_version=10)  # nothing else of the service may be touched
    state, error = RL_KIND.run(service, SimpleNamespace(op=rl_op([8], 1)))
    assert state == "failed" and error.startswith("nothing trained: while the job was queued, samples[0]"), error
    with pytest.raises(OpError, match="max_staleness=1"):
        RL_KIND.admit(service, rl_op([8], 1))


def test_the_weights_version_continues_across_trainers_and_is_read_by_the_api(tmp_path):
    reader = WeightsVersionReader(tmp_path)
    assert reader.read() is None  # no trainer yet
    writer = WeightsVersionWriter(tmp_path)
    assert writer.value == 0 and reader.read() == 0
    writer.write(41)
    assert reader.read() == 41  # the same mapping, no reopen
    # A new trainer continues past the last value: the weights it finds may not be what 41 described.
    assert WeightsVersionWriter(tmp_path).value == 42 and reader.read() == 42
