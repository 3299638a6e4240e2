"""Scenario 5: poison jobs (each run kills its worker process) among normal traffic.

A poison job (``probe(fault="crash")``: ``os._exit`` inside the job) kills the pool child
on every attempt. It must fail for good after ``max_attempts`` starts with a clear error,
while normal jobs submitted at a steady rate keep flowing on the same worker. Measured:
time until each poison job failed, and the latency (submitted -> success) of the normal
jobs while the poison was being retried.

Quick: 2 poison + 40 normal jobs. Full (``-m slow``): 10 poison + 400 normal jobs.
"""

from __future__ import annotations

import threading
import time

import pytest

from morag.core.config import settings
from morag.services.jobs import TaskStatus
from tests.reliability.support import audit, percentile, wait_all_final


@pytest.mark.parametrize(
    ("poison", "normal"),
    [pytest.param(2, 40, id="quick"), pytest.param(10, 400, id="full", marks=pytest.mark.slow)],
)
def test_poison_jobs_fail_for_good_while_others_flow(
    workers, submitter, report, poison: int, normal: int
) -> None:
    worker = workers.start(queues="celery", concurrency=2, lease_seconds="1.5")
    started = time.monotonic()
    poison_ids = [submitter.probe(fault="crash") for _ in range(poison)]
    normal_ids: list[str] = []

    def feed() -> None:  # normal traffic at a steady rate while the poison is retried
        for _ in range(normal):
            normal_ids.append(submitter.probe(steps=1, step_seconds=0.01))
            time.sleep(0.05)  # pacing of the load generator, not a wait for a condition

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join(120)
    ids = poison_ids + normal_ids
    records = wait_all_final(submitter.store, ids, timeout=120)
    wall = time.monotonic() - started
    assert worker.alive(), worker.log()

    expected = {task_id: settings.max_attempts for task_id in poison_ids}
    tally = audit(f"poison/{poison}+{normal}", submitter.store, ids, records, expected)
    poison_s = [
        (records[i].finished_at - records[i].created_at).total_seconds()
        for i in poison_ids
        if records[i] and records[i].finished_at
    ]
    latency = [
        (records[i].finished_at - records[i].created_at).total_seconds()
        for i in normal_ids
        if records[i] and records[i].finished_at
    ]
    report.record(
        tally,
        max_attempts=settings.max_attempts,
        poison_failed_after_s_max=round(max(poison_s, default=0), 1),
        normal_latency_p50_s=round(percentile(latency, 0.5), 2),
        normal_latency_p95_s=round(percentile(latency, 0.95), 2),
        normal_latency_max_s=round(max(latency, default=0), 2),
        wall_s=round(wall, 1),
    )
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert tally.failed == poison and tally.completed == normal, tally.problems
    for task_id in poison_ids:
        info = records[task_id]
        assert info.error_type == "AttemptsExhausted"
        assert info.attempts == settings.max_attempts
        assert f"gave up after {settings.max_attempts} attempts" in info.error
        assert "died or was killed" in info.error
    for task_id in normal_ids:
        assert records[task_id].attempts == 1
    assert all(records[i].status is TaskStatus.SUCCESS for i in normal_ids)
