"""The seed's integration tests, made race-free, and the task queue's guarantees:
routing, job records, cancellation, crash safety and queue statistics, against a real
Redis and real worker processes."""

from __future__ import annotations

import os
import signal
import time
from datetime import UTC
from pathlib import Path

import pytest

from morag.core.config import settings
from morag.core.errors import NotFoundError
from morag.services.jobs import TaskInfo, TaskStatus, get_job_store
from morag.services.task_manager import task_manager
from morag.tasks.base import (
    process_audio_task,
    process_document_task,
    process_video_task,
    process_web_task,
)
from morag.tasks.system_tasks import probe
from tests.harness import pool_children, wait_for

pytestmark = pytest.mark.usefixtures("isolated")


def wait_final(task_id: str, timeout: float = 30):
    return wait_for(
        lambda: (i := task_manager.get_task_status(task_id)).status.is_final and i,
        timeout,
        f"job {task_id} to finish",
    )


def wait_state(task_id: str, states: set[TaskStatus], timeout: float = 30):
    return wait_for(
        lambda: (i := task_manager.get_task_status(task_id)).status in states and i,
        timeout,
        f"job {task_id} to reach {states}",
    )


@pytest.fixture
def text_file(upload_dir: Path) -> Path:
    path = upload_dir / f"notes-{os.getpid()}-{time.monotonic_ns()}.md"
    path.write_text("# Notes\n\nThe task queue keeps every job.\n\n## Details\n\nNothing lost.\n")
    return path


def test_a_submission_writes_its_record_and_message_in_one_redis_call(redis_client) -> None:
    """With morag's transport, ``apply_async`` writes the job record and pushes the task
    message in one script call (core/broker.py, tasks/processing.py): one command from a
    client for the submission, the LPUSH made inside it, after the record's writes. The
    message reaches its queue's list with no queue declared, and shows monitors plain
    reprs of its arguments (``broker.publish_options``)."""
    import uuid

    from kombu.utils import json as kombu_json

    probe.apply_async()  # the scripts loaded into this Redis (a first call may load them)
    redis_client.delete(f"{settings.key_prefix}:celery")
    task_id = str(uuid.uuid4())
    sentinel = f"end-{task_id}"
    with redis_client.monitor() as monitor:
        probe.apply_async(kwargs={"steps": 2}, task_id=task_id)
        redis_client.echo(sentinel)
        seen = []
        while sentinel not in (command := monitor.next_command())["command"]:
            seen.append((command["client_type"] == "lua", command["command"]))
    sent = [c for lua, c in seen if not lua and task_id in c]
    assert len(sent) == 1 and sent[0].startswith("EVALSHA"), sent
    in_script = [c.split()[0] for lua, c in seen if lua]
    assert "LPUSH" in in_script and in_script.index("LPUSH") > in_script.index("HSET")
    assert not [c for lua, c in seen if not lua and c.startswith("LPUSH")]
    record = get_job_store(settings).get(task_id)
    assert record is not None and record.status is TaskStatus.PENDING
    queued = redis_client.lrange(f"{settings.key_prefix}:celery", 0, -1)
    messages = [kombu_json.loads(m) for m in queued]
    assert [m["headers"]["id"] for m in messages] == [task_id]
    assert messages[0]["headers"]["kwargsrepr"] == "{'steps': 2}"
    assert messages[0]["headers"]["argsrepr"] == "()"


def test_task_submission(workers, text_file: Path) -> None:
    """A submitted job is known at once (its record precedes the message) and succeeds."""
    result = process_document_task.delay(
        file_path=str(text_file), source_type="document", metadata={"test": True}
    )
    assert result.task_id is not None
    info = task_manager.get_task_status(result.task_id)
    assert info.task_id == result.task_id
    assert info.status is TaskStatus.PENDING  # no worker yet: queued, not unknown
    assert info.kind == "document" and info.metadata == {"test": True}

    workers.start(queues="document_processing")
    done = wait_final(result.task_id)
    assert done.status is TaskStatus.SUCCESS, done.error
    assert done.progress == 1.0 and done.attempts == 1
    assert done.created_at <= done.started_at <= done.finished_at
    assert done.created_at.tzinfo is UTC and done.finished_at.tzinfo is UTC
    assert done.result["chunk_count"] >= 1


def test_queue_stats(text_file: Path) -> None:
    """Counts are the messages on the broker, per queue, with no worker consuming."""
    stats = task_manager.get_queue_stats()
    assert stats["pending_total"] == 0 and stats["workers"] == []
    process_document_task.delay(file_path=str(text_file))
    process_document_task.delay(file_path=str(text_file))
    process_web_task.delay(url="http://127.0.0.1:9/")
    probe.delay()
    probe.apply_async(priority=9)  # lands in a Redis priority sub-queue
    stats = task_manager.get_queue_stats()
    assert {q: s["pending"] for q, s in stats["queues"].items()} == {
        "document_processing": 2,
        "audio_processing": 0,
        "video_processing": 0,
        "web_processing": 1,
        "celery": 2,
    }
    assert stats["pending_total"] == 5
    assert all(s["consumers"] == 0 for s in stats["queues"].values())
    assert isinstance(stats["workers"], list) and stats["active_tasks"] == 0


def test_each_task_is_consumed_from_its_own_queue(workers, text_file: Path) -> None:
    """A worker on document_processing only runs the document job; the others wait."""
    doc = process_document_task.delay(file_path=str(text_file))
    others = {
        "audio_processing": process_audio_task.delay(file_path=str(text_file)),
        "video_processing": process_video_task.delay(file_path=str(text_file)),
        "web_processing": process_web_task.delay(url="http://127.0.0.1:9/"),
        "celery": probe.delay(),
    }
    workers.start(queues="document_processing")
    assert wait_final(doc.id).status is TaskStatus.SUCCESS
    lengths = task_manager.queue_lengths()
    for queue, job in others.items():
        info = task_manager.get_task_status(job.id)
        assert info.status is TaskStatus.PENDING and info.queue == queue
        assert lengths[queue] == 1, (queue, lengths)
    assert lengths["document_processing"] == 0
    stats = task_manager.get_queue_stats()
    assert stats["queues"]["document_processing"]["consumers"] == 1
    assert stats["queues"]["audio_processing"]["consumers"] == 0


def test_unknown_id_is_not_found() -> None:
    with pytest.raises(NotFoundError):
        task_manager.get_task_status("never-submitted-id")
    with pytest.raises(NotFoundError):
        task_manager.cancel("never-submitted-id")


def test_progress_is_recorded_and_monotonic(workers) -> None:
    workers.start(queues="celery")
    job = probe.delay(steps=5, step_seconds=0.05)
    assert wait_final(job.id).status is TaskStatus.SUCCESS
    history = get_job_store(settings).history(job.id)
    states = [e["state"] for e in history]
    assert states[0] == "pending" and states[1] == "started" and states[-1] == "success"
    progress = [e["progress"] for e in history]
    assert progress == sorted(progress) and progress[-1] == 1
    assert [e["message"] for e in history if e["state"] == "progress"][-1] == "step 5 of 5"


def test_queued_job_cancelled_without_workers_never_starts(workers) -> None:
    job = probe.delay(steps=1)
    outcome = task_manager.cancel(job.id)
    assert outcome.outcome == "revoked"
    assert task_manager.get_task_status(job.id).status is TaskStatus.REVOKED
    # The revoke broadcast was heard by nobody; the record's flag must still stop it.
    workers.start(queues="celery")
    follower = probe.delay()
    assert wait_final(follower.id).status is TaskStatus.SUCCESS  # the queue was drained
    info = task_manager.get_task_status(job.id)
    assert info.status is TaskStatus.REVOKED and info.attempts == 0
    assert "started" not in [e["state"] for e in get_job_store(settings).history(job.id)]


def test_running_job_cancelled_stops_within_two_seconds(workers) -> None:
    workers.start(queues="celery", concurrency=1)
    job = probe.delay(steps=600, step_seconds=0.1)
    wait_state(job.id, {TaskStatus.PROGRESS})
    asked, asked_at = time.monotonic(), time.time()
    assert task_manager.cancel(job.id).outcome == "cancelling"
    info = wait_final(job.id, timeout=5)
    elapsed = time.monotonic() - asked
    assert info.status is TaskStatus.REVOKED and elapsed < 2.0, elapsed
    # The slot is free at once: the single worker process takes the next job.
    follower = probe.delay()
    running = {TaskStatus.STARTED, TaskStatus.PROGRESS, TaskStatus.SUCCESS}
    started = wait_state(follower.id, running, timeout=15)
    assert started.started_at.timestamp() - asked_at < 2.0


def test_a_pool_process_recycled_after_its_jobs_is_replaced_at_once(workers) -> None:
    from morag.core.celery_app import celery_app

    per_process = celery_app.conf.worker_max_tasks_per_child
    assert per_process == 1000  # the seed's setting
    worker = workers.start(queues="celery", concurrency=1)
    first = pool_children(worker.pid)
    store = get_job_store(settings)
    ids = [probe.delay().id for _ in range(per_process + 5)]

    def all_ended() -> list[TaskInfo] | None:
        infos = store.get_many(ids)
        return [i for i in infos if i] if all(i and i.status.is_final for i in infos) else None

    infos = wait_for(all_ended, 120, f"{len(ids)} jobs to end")
    assert {i.status for i in infos} == {TaskStatus.SUCCESS}
    now = pool_children(worker.pid)
    assert len(now) == 1 and now != first  # the process that ran 1,000 jobs was replaced
    # Celery's own pool leaves the slot empty until its next maintenance (5 s) when the
    # process's exit is noticed a moment before it can be reaped: the next job waits.
    runs = sorted(infos, key=lambda i: i.started_at)
    longest_wait = max(
        later.started_at.timestamp() - earlier.finished_at.timestamp()
        for earlier, later in zip(runs, runs[1:], strict=False)
    )
    assert longest_wait < 1.0, longest_wait


def test_cancelling_a_finished_job_is_a_no_op(workers) -> None:
    workers.start(queues="celery")
    job = probe.delay()
    assert wait_final(job.id).status is TaskStatus.SUCCESS
    outcome = task_manager.cancel(job.id)
    assert outcome.outcome == "final" and outcome.detail == "success"
    assert task_manager.cancel_task(job.id) is False
    assert task_manager.get_task_status(job.id).status is TaskStatus.SUCCESS


def test_pool_child_killed_mid_job_is_redelivered(workers) -> None:
    worker = workers.start(queues="celery", concurrency=1)
    job = probe.delay(steps=20, step_seconds=0.1)
    wait_state(job.id, {TaskStatus.PROGRESS})
    for child in pool_children(worker.pid):
        os.kill(child, signal.SIGKILL)
    info = wait_final(job.id, timeout=60)
    assert info.status is TaskStatus.SUCCESS and info.attempts == 2


def test_whole_worker_killed_mid_job_is_recovered_by_the_next_worker(workers) -> None:
    first = workers.start(queues="celery", concurrency=1)
    job = probe.delay(steps=30, step_seconds=0.1)
    wait_state(job.id, {TaskStatus.PROGRESS})
    first.kill(signal.SIGKILL)
    restarted = time.monotonic()
    workers.start(queues="celery", concurrency=1)
    info = wait_final(job.id, timeout=60)
    assert info.status is TaskStatus.SUCCESS and info.attempts == 2
    assert time.monotonic() - restarted < 60


def test_job_that_kills_its_worker_every_time_fails_for_good(workers) -> None:
    workers.start(queues="celery", concurrency=1)
    poison = probe.delay(fault="crash")
    info = wait_final(poison.id, timeout=90)
    assert info.status is TaskStatus.FAILURE and info.error_type == "AttemptsExhausted"
    assert "3 attempts" in info.error
    assert wait_final(probe.delay().id).status is TaskStatus.SUCCESS  # the queue flows


def test_transient_errors_retry_then_fail_with_the_reason(workers) -> None:
    workers.start(queues="celery")
    job = probe.delay(fault="transient")
    info = wait_final(job.id)
    assert info.status is TaskStatus.FAILURE and info.attempts == 3
    assert info.error_type == "TransientError" and "injected" in info.error
    assert [e["state"] for e in get_job_store(settings).history(job.id)].count("retry") == 2


def test_unexpected_errors_fail_without_retry(workers) -> None:
    workers.start(queues="celery")
    info = wait_final(probe.delay(fault="error").id)
    assert info.status is TaskStatus.FAILURE and info.attempts == 1
    assert info.error_type == "ValueError" and "injected error" in info.error


def test_input_outside_allowed_roots_is_refused(workers, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    workers.start(queues="document_processing")
    info = wait_final(process_document_task.delay(file_path=str(outside)).id)
    assert info.status is TaskStatus.FAILURE and info.error_type == "ForbiddenTargetError"
    assert info.attempts == 1


def test_update_progress_keeps_its_metadata(workers) -> None:
    """The seed's ``update_progress(progress, message, **metadata)``: the metadata of each
    report reaches its history event, and the latest is kept in the record."""
    workers.start()
    job = probe.delay(steps=2, step_seconds=0)
    assert wait_final(job.id).status is TaskStatus.SUCCESS
    reports = [e for e in get_job_store(settings).history(job.id) if e["stage"] == "probing"]
    assert [e["metadata"] for e in reports] == [{"step": 1}, {"step": 2}]
    assert get_job_store(settings).get(job.id).progress_metadata == {"step": 2}


def test_task_manager_contract_methods(workers) -> None:
    """``update_task_progress`` records progress with its metadata on a running job;
    ``cancel_task`` answers True when it stopped a job and False when it had finished."""
    store = get_job_store(settings)
    running = probe.delay(steps=200, step_seconds=0.05)  # no worker yet: it stays queued
    assert store.start(running.id, worker="w", lease_seconds=30, max_attempts=3).outcome == "ok"
    answer = task_manager.update_task_progress(running.id, 0.4, "halfway", {"pages": 3}, "reading")
    assert answer == "ok"
    info = task_manager.get_task_status(running.id)
    assert (info.progress, info.stage, info.message) == (0.4, "reading", "halfway")
    assert info.progress_metadata == {"pages": 3}
    assert store.history(running.id)[-1]["metadata"] == {"pages": 3}

    queued = probe.delay(steps=0)
    assert task_manager.cancel_task(queued.id) is True
    assert task_manager.get_task_status(queued.id).status is TaskStatus.REVOKED
    workers.start()
    done = probe.delay(steps=0)
    assert wait_final(done.id).status is TaskStatus.SUCCESS
    assert task_manager.cancel_task(done.id) is False
    assert task_manager.get_task_status(running.id).completed_at is None
    assert task_manager.get_task_status(done.id).completed_at is not None
