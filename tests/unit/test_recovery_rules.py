"""When an unacked message belongs to a dead worker (pure decision logic)."""

from __future__ import annotations

from datetime import UTC, datetime

from morag.services.jobs import TaskInfo, TaskStatus
from morag.services.recovery import is_left_over, should_restore

NOW = 1_000_000.0


def job(status: TaskStatus, **fields) -> TaskInfo:
    return TaskInfo(task_id="t", status=status, **fields)


def decide(info: TaskInfo | None, *, leased: bool = False, age: float = 0.0) -> bool:
    return should_restore(info, leased=leased, delivered_at=NOW - age, now=NOW, grace_seconds=20)


def test_running_job_without_lease_is_restored_at_once() -> None:
    assert decide(job(TaskStatus.STARTED)) is True
    assert decide(job(TaskStatus.PROGRESS)) is True


def test_running_job_with_lease_is_left_alone_however_long() -> None:
    assert decide(job(TaskStatus.PROGRESS), leased=True, age=86_400) is False


def test_final_jobs_are_never_restored() -> None:
    for status in (TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.REVOKED):
        assert decide(job(status), age=86_400) is False


def test_unstarted_job_is_restored_after_the_grace_period() -> None:
    assert decide(job(TaskStatus.PENDING), age=5) is False
    assert decide(job(TaskStatus.PENDING), age=25) is True
    assert decide(None, age=25) is True  # a raw Celery message without a record


def test_retry_waits_for_its_countdown_plus_grace() -> None:
    retry_at = datetime.fromtimestamp(NOW - 10, UTC)
    assert decide(job(TaskStatus.RETRY, retry_at=retry_at), age=100) is False
    retry_at = datetime.fromtimestamp(NOW - 30, UTC)
    assert decide(job(TaskStatus.RETRY, retry_at=retry_at), age=100) is True


def test_an_ended_jobs_message_is_dropped_after_the_grace_period() -> None:
    def left_over(info: TaskInfo | None, age: float) -> bool:
        return is_left_over(info, delivered_at=NOW - age, now=NOW, grace_seconds=20)

    for status in (TaskStatus.SUCCESS, TaskStatus.FAILURE, TaskStatus.REVOKED):
        assert left_over(job(status), age=5) is False  # its worker acks it in a moment
        assert left_over(job(status), age=25) is True
    for status in (TaskStatus.PENDING, TaskStatus.STARTED, TaskStatus.RETRY):
        assert left_over(job(status), age=86_400) is False
    assert left_over(None, age=86_400) is False  # no record: restored (should_restore)
