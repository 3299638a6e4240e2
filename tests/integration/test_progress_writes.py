"""How a running job's progress reports reach its record (tasks/processing.py's
``_ProgressWriter`` and the lease thread), against a real Redis: a stage reported soon
after the last write is held, then written when due or with the outcome, in its place
in the history and with the time it was made; no stage is lost."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest

from morag.core.config import settings
from morag.core.errors import JobCancelledError
from morag.services.jobs import JobStore, TaskStatus, get_job_store
from morag.tasks.processing import _lease_keeper, _ProgressWriter
from tests.harness import wait_for

pytestmark = pytest.mark.usefixtures("isolated")

INTERVAL = 2.0  # seconds between two writes of one job: ample, so no report races it


def claimed_job(store: JobStore) -> _ProgressWriter:
    task_id = str(uuid.uuid4())
    store.create(task_id, kind="system", queue="celery", task_name="test")
    claim = store.start(task_id, worker="w", lease_seconds=30, max_attempts=3)
    assert claim.outcome == "ok"
    return _ProgressWriter(store, task_id, "w", INTERVAL)


def stages(store: JobStore, task_id: str) -> list[tuple[str, str]]:
    return [(e["state"], e["stage"]) for e in store.history(task_id)]


def test_reports_of_a_short_job_are_written_with_its_outcome() -> None:
    store = get_job_store(settings)
    job = claimed_job(store)
    job.report(0.3, "reading", None)  # held: the claim was just written
    job.report(0.6, None, "more")  # the latest report of that stage
    assert len(store.history(job.task_id)) == 2 and job.due is not None  # nothing written
    job.report(0.8, "chunking", None)  # the held stage is written now
    assert stages(store, job.task_id)[-1] == ("progress", "reading")
    store.finish(job.task_id, TaskStatus.SUCCESS, worker="w", last_report=job.close())
    assert stages(store, job.task_id) == [
        ("pending", "queued"),
        ("started", "started"),
        ("progress", "reading"),
        ("progress", "chunking"),
        ("success", "success"),
    ]
    reading = store.history(job.task_id)[2]
    assert reading["progress"] == 0.6 and reading["message"] == "more"
    job.report(0.9, "late", None)  # closed: nothing more is written
    assert len(store.history(job.task_id)) == 5


def test_a_held_report_is_written_when_due_with_the_time_it_was_made() -> None:
    store = get_job_store(settings)
    job = claimed_job(store)
    _lease_keeper.hold(job)
    try:
        made = datetime.now().astimezone()
        job.report(0.5, "transcribing", None)
        assert job.due is not None  # held
        wait_for(
            lambda: store.get(job.task_id).stage == "transcribing",  # type: ignore[union-attr]
            10,
            "the held report to be written by the lease thread",
        )
        event = store.history(job.task_id)[-1]
        assert event["stage"] == "transcribing"
        # written about INTERVAL later, stamped when it was made
        assert abs(datetime.fromisoformat(event["ts"]).timestamp() - made.timestamp()) < 1.0
    finally:
        _lease_keeper.release()
    assert job.close() is None  # nothing left for the outcome


def test_a_cancel_answered_to_a_held_write_stops_the_job_at_its_next_report() -> None:
    store = get_job_store(settings)
    job = claimed_job(store)
    _lease_keeper.hold(job)
    try:
        job.report(0.1, "converting", None)
        store.request_cancel(job.task_id)
        wait_for(lambda: job.due is None, 10, "the held report to be written")
        with pytest.raises(JobCancelledError):
            job.report(0.2, None, None)
    finally:
        _lease_keeper.release()
