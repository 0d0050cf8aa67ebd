"""The job book, the journal and its recovery, ``Frontend.wait`` and request building,
without a vLLM server."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

from hogwild.contracts.jobs import SubmitBTRMOp, SubmitOp, SubmitReadoutOp
from hogwild.contracts.protocol import JobInfo, JobOp, OpError
from hogwild.plugin.api_server.frontend import Frontend
from hogwild.plugin.api_server.http_errors import ApiError
from hogwild.plugin.api_server.job_requests import job_request
from hogwild.plugin.api_server.paths import PathPolicy
from hogwild.plugin.api_server.schemas import BTRMTrainRequest, ReadoutTrainRequest, TrainRequest
from hogwild.plugin.api_server.trainer_client import TrainerUnavailable
from hogwild.worker.jobs import JobBook
from hogwild.worker.journal import KEEP_FINISHED, UNREADABLE, JobJournal

SAMPLE = {"context_ids": [1, 2], "continuation_ids": [3]}


def sft(**options) -> SubmitOp:
    return job_request(TrainRequest(samples=[SAMPLE], **options), PathPolicy([Path("/tmp")]))


def book(directory: Path, max_queued: int = 4) -> JobBook:
    return JobBook(JobJournal(directory), "trainer-a", max_queued)


# ---- the job book ---------------------------------------------------------


def test_jobs_run_in_order_and_end_answerable(tmp_path):
    jobs = book(tmp_path)
    first, second = jobs.add(sft(), 1, []), jobs.add(sft(lr=1e-3), 1, [])
    assert [j.info.state for j in jobs.pending] == ["queued", "queued"]
    job = jobs.next(lambda: False)
    assert job.info.job_id == first.job_id and jobs.running is job
    jobs.started(job)
    assert json.loads((tmp_path / f"{first.job_id}.json").read_text())["state"] == "running"
    job.info.state = "succeeded"
    jobs.end(job)
    assert jobs.running is None and jobs.get(first.job_id).info.state == "succeeded"
    assert not (tmp_path / f"{first.job_id}.request.json").exists()  # its samples are no longer kept
    assert jobs.ended == {"sft/succeeded": 1} and jobs.submitted == {"sft": 2}
    assert jobs.next(lambda: False).info.job_id == second.job_id


def test_a_full_queue_refuses_and_keeps_nothing(tmp_path):
    jobs = book(tmp_path, max_queued=1)
    jobs.add(sft(), 1, [])
    with pytest.raises(OpError) as refused:
        jobs.add(sft(), 1, [])
    assert refused.value.code == "busy" and len(list(tmp_path.glob("*.request.json"))) == 1


def test_cancelling_a_queued_job_ends_it_and_a_running_one_asks_it_to_stop(tmp_path):
    jobs = book(tmp_path)
    a, b = jobs.add(sft(), 1, []), jobs.add(sft(), 1, [])
    running = jobs.next(lambda: False)
    assert jobs.cancel(a.job_id).state == "queued" and running.cancel_requested  # after its current step
    assert jobs.cancel(b.job_id).state == "cancelled" and not jobs.pending
    with pytest.raises(OpError, match="already ended"):
        jobs.cancel(b.job_id)


def test_next_wakes_for_a_job_added_from_another_thread(tmp_path):
    jobs = book(tmp_path)
    taken = []
    t = threading.Thread(target=lambda: taken.append(jobs.next(lambda: False)))
    t.start()
    info = jobs.add(sft(), 1, [])
    t.join(timeout=10)
    assert taken and taken[0].info.job_id == info.job_id


def test_a_failed_journal_write_at_the_end_still_ends_the_job_in_memory(tmp_path):
    jobs = book(tmp_path)
    info = jobs.add(sft(), 1, [])
    job = jobs.next(lambda: False)
    job.info.state = "failed"
    jobs.end(job, journal=False)  # what the service does after the journal write raised
    assert jobs.running is None and jobs.get(info.job_id).info.done


# ---- recovery from the journal --------------------------------------------


def test_a_request_sent_again_under_its_key_is_the_job_it_already_is(tmp_path):
    jobs = book(tmp_path, max_queued=1)
    keyed = sft(lr=1e-3).model_copy(update={"idempotency_key": "k-1"})
    assert jobs.admitted(keyed) is None and jobs.admitted(sft(lr=1e-3)) is None  # no key: always a new job
    first = jobs.add(keyed, 1, [])
    assert jobs.admitted(sft(lr=1e-3).model_copy(update={"idempotency_key": "k-1"})).job_id == first.job_id
    with pytest.raises(OpError) as refused:  # the key names a job: another request may not reuse it
        jobs.admitted(sft(lr=2e-3).model_copy(update={"idempotency_key": "k-1"}))
    assert refused.value.code == "invalid" and first.job_id in str(refused.value)
    assert len(jobs.pending) == 1
    job = jobs.next(lambda: False)
    jobs.started(job)
    job.info.state = "succeeded"
    jobs.end(job)
    # A trainer started later knows the key from the journal, as long as it keeps the job.
    again = book(tmp_path)
    again.recover("restarted")
    assert again.admitted(keyed).job_id == first.job_id and again.admitted(keyed).state == "succeeded"
    for _ in range(KEEP_FINISHED):
        job = again.get(again.add(sft(), 1, []).job_id)
        again.next(lambda: False)
        job.info.state = "succeeded"
        again.end(job)
    assert again.admitted(keyed) is None and again.by_key == {}


def test_recovery_requeues_queued_jobs_fails_the_running_one_and_keeps_finished_ones(tmp_path):
    old = book(tmp_path)
    done, running, queued = old.add(sft(), 1, []), old.add(sft(), 1, []), old.add(sft(), 1, [])
    job = old.next(lambda: False)
    old.started(job)
    job.info.state = "succeeded"
    old.end(job)
    job = old.next(lambda: False)
    old.started(job)
    old.progress(job, 3, 10)  # then the process dies

    new = book(tmp_path)
    failed = new.recover("the training process was killed by SIGKILL")
    assert [f.job_id for f in failed] == [running.job_id]
    assert "killed by SIGKILL while this job was running; at least 3 of 10 steps" in new.get(running.job_id).info.error
    assert new.get(done.job_id).info.state == "succeeded"
    assert [j.info.job_id for j in new.pending] == [queued.job_id]
    assert new.pending[0].op == old.get(queued.job_id).op  # its samples came back whole


def test_a_record_that_no_longer_parses_is_kept_aside_with_its_reason_never_dropped(tmp_path):
    old = book(tmp_path)
    kept, broken_info, broken_request = (old.add(sft(), 1, []) for _ in range(3))
    (tmp_path / f"{broken_info.job_id}.json").write_text('{"job_id": "' + broken_info.job_id + '", "state": "weird"}')
    request = tmp_path / f"{broken_request.job_id}.request.json"
    request.write_text(request.read_text().replace('"sft"', '"a-mode-from-the-future"'))

    new = book(tmp_path)
    new.recover("stopped")
    aside = tmp_path / UNREADABLE
    assert sorted(p.name for p in aside.glob("*.json")) == sorted([f"{broken_info.job_id}.json", request.name])
    assert "ValidationError" in (aside / f"{broken_info.job_id}.json.reason").read_text()
    assert new.set_aside == 2
    assert {u.job_id for u in new.journal.unreadable()} == {broken_info.job_id, broken_request.job_id}
    # The job whose request was lost is failed saying so; the readable one runs again.
    lost = new.get(broken_request.job_id).info
    assert lost.state == "failed" and "could not be read back" in lost.error and UNREADABLE in lost.error
    assert [j.info.job_id for j in new.pending] == [kept.job_id]
    assert book(tmp_path).journal.load()[1] == []  # a second start finds nothing new to set aside


# ---- request building -----------------------------------------------------


def test_requests_become_job_requests_with_their_options_and_confined_paths(tmp_path):
    paths = PathPolicy([tmp_path])
    op = job_request(TrainRequest(samples=[SAMPLE], lr=1e-3, steps=7), paths)
    assert isinstance(op, SubmitOp) and op.options.lr == 1e-3 and op.options.steps == 7
    readout = job_request(ReadoutTrainRequest(stories="stories", layers=[0], out="out"), paths)
    assert isinstance(readout, SubmitReadoutOp) and readout.out == str(tmp_path / "out")
    with pytest.raises(ApiError) as outside:
        job_request(ReadoutTrainRequest(stories="/etc", layers=[0], out="out"), paths)
    assert outside.value.status == 403 and "stories" in str(outside.value)


def test_a_btrm_config_path_is_read_on_the_server_and_its_sources_confined(tmp_path):
    (tmp_path / "bad.yaml").write_text("heads: nope\n")
    with pytest.raises(ApiError) as bad:
        job_request(BTRMTrainRequest(mode="btrm", config_path="bad.yaml"), PathPolicy([tmp_path]))
    assert bad.value.status == 422 and "config_path" in str(bad.value)
    from hogwild.training.btrm_corpora import write_corpora

    config_path = write_corpora(tmp_path / "corpora", per_tier=4, seed=0)
    op = job_request(BTRMTrainRequest(mode="btrm", config_path=str(config_path)), PathPolicy([tmp_path]))
    assert isinstance(op, SubmitBTRMOp)
    assert all(Path(s.path).is_absolute() and Path(s.path).is_relative_to(tmp_path)
               for h in op.config.heads for s in h.positive_sources)


# ---- Frontend.wait -----------------------------------------------------------


class Trainer:
    """A trainer as ``Frontend.call`` sees it: answers ``JobOp`` from a script."""

    def __init__(self, answers):
        self.answers, self.asked = list(answers), 0

    async def request(self, body, timeout=30.0, connect_timeout=1.0):
        assert isinstance(body, JobOp)
        self.asked += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Engine:
    def __init__(self):
        self.resets = 0

    async def reset_prefix_cache(self, reset_running_requests=False):
        self.resets += 1
        return True


def frontend(trainer, wait_timeout=30.0) -> Frontend:
    fe = Frontend.__new__(Frontend)  # its routes' state, without an engine behind it
    fe.unsupported, fe.client, fe.engine, fe.waiters = None, trainer, Engine(), {}
    fe.cache_state, fe.cache_lock, fe.wait_timeout = (None, -1), asyncio.Lock(), wait_timeout
    fe.process = type("P", (), {"last_exit": None, "restarts": 0})()
    return fe


def info(state: str, **kw) -> JobInfo:
    return JobInfo(job_id="job-1", trainer_id="t", mode="sft", state=state, n_samples=1, submitted_at=time.time(), **kw)


def test_wait_answers_from_the_job_finished_event_and_refreshes_the_cache():
    async def go():
        fe = frontend(Trainer([info("running", step=1, total_steps=4)]))
        waiting = asyncio.create_task(fe.wait("job-1"))
        while not fe.waiters.get("job-1"):
            await asyncio.sleep(0.01)
        fe.waiters["job-1"][0].set_result(info("succeeded", weights_version=3))  # what on_event does
        done = await asyncio.wait_for(waiting, 5)
        return fe, done

    fe, done = asyncio.run(go())
    assert done.state == "succeeded" and fe.engine.resets == 1 and fe.cache_state == ("t", 3) and not fe.waiters


def test_wait_answers_when_the_event_was_lost_by_asking_again(monkeypatch):
    monkeypatch.setattr("hogwild.plugin.api_server.frontend.WAIT_FALLBACK_POLL_S", 0.05)
    trainer = Trainer([info("running"), info("running"), info("succeeded", weights_version=1)])
    done = asyncio.run(asyncio.wait_for(frontend(trainer).wait("job-1"), 5))
    assert done.state == "succeeded" and trainer.asked == 3


def test_wait_waits_through_a_trainer_restart(monkeypatch):
    monkeypatch.setattr("hogwild.plugin.api_server.frontend.WAIT_FALLBACK_POLL_S", 0.05)
    trainer = Trainer([TrainerUnavailable("restarting"), info("failed", error="killed")])
    done = asyncio.run(asyncio.wait_for(frontend(trainer).wait("job-1"), 5))
    assert done.state == "failed" and trainer.asked == 2


def test_wait_gives_up_at_its_deadline_with_a_504_saying_where_the_job_is(monkeypatch):
    monkeypatch.setattr("hogwild.plugin.api_server.frontend.WAIT_FALLBACK_POLL_S", 0.05)
    trainer = Trainer([info("running", step=2, total_steps=9)])
    with pytest.raises(ApiError) as gave_up:
        asyncio.run(asyncio.wait_for(frontend(trainer, wait_timeout=0.3).wait("job-1"), 5))
    assert gave_up.value.status == 504 and "running (step 2 of 9)" in str(gave_up.value) and "GET /train/job-1" in str(gave_up.value)


def test_wait_passes_on_what_is_not_a_restart():
    trainer = Trainer([ApiError(404, "no job")])
    with pytest.raises(ApiError) as missing:
        asyncio.run(frontend(trainer).wait("job-1"))
    assert missing.value.status == 404


# ---- the one guard around every job -----------------------------------------


def service_with_a_job(tmp_path, op):
    from hogwild.worker.service import TrainerService

    service = TrainerService(tmp_path / "session", tmp_path / "state")
    service.state = "ready"
    service.jobs.add(op, 0, [])
    return service, service.jobs.next(lambda: False)


def finished_event(service):
    client, event = service.outbox.get_nowait()
    assert client is None and event.event == "job_finished"
    return event.job


def test_whatever_a_kind_raises_ends_the_job_failed_with_its_type_and_message(tmp_path, monkeypatch):
    from hogwild.contracts.jobs import SubmitRevertOp
    from hogwild.worker.kinds import KINDS

    def broken(service, job):
        raise AttributeError("'NoneType' object has no attribute 'optimizer'")

    monkeypatch.setattr(KINDS[SubmitRevertOp], "run", broken)
    service, job = service_with_a_job(tmp_path, SubmitRevertOp())
    service._run(job)
    ended = finished_event(service)
    assert ended.state == "failed" and ended.error == "AttributeError: 'NoneType' object has no attribute 'optimizer'"
    assert service.jobs.running is None and json.loads((tmp_path / "state" / "jobs" / f"{ended.job_id}.json").read_text())[
        "state"] == "failed"
    # The job thread goes on: the next job runs (revert's own refusal: nothing is merged).
    monkeypatch.undo()
    service.jobs.add(SubmitRevertOp(), 0, [])
    service._run(service.jobs.next(lambda: False))
    assert "no circuit-breaker adapter" in finished_event(service).error


def test_a_job_recovered_while_the_model_failed_to_load_is_answered(tmp_path):
    service, job = service_with_a_job(tmp_path, sft())
    service.state, service.reason = "failed", "could not build the training model: OSError: no weights"
    assert service.trainer is None
    service._run(job)
    ended = finished_event(service)
    assert ended.state == "failed" and "could not build the training model" in ended.error


def test_a_journal_that_fails_at_the_end_fails_the_job_and_still_answers(tmp_path, monkeypatch):
    from hogwild.contracts.jobs import SubmitRevertOp

    service, job = service_with_a_job(tmp_path, SubmitRevertOp())
    real_save = service.jobs.journal.save

    def full_disk(info, durable=True):
        if info.done:
            raise OSError(28, "No space left on device")
        real_save(info, durable)

    monkeypatch.setattr(service.jobs.journal, "save", full_disk)
    service._run(job)
    ended = finished_event(service)
    assert ended.state == "failed" and "its end could not be journaled (OSError" in ended.error
    assert "it had ended failed: no circuit-breaker adapter" in ended.error and service.jobs.running is None
