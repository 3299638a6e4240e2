"""Scenario 4: a job running longer than the broker's visibility timeout is not started twice.

The worker runs with a 3 s visibility timeout (allowed because its time limits are shrunk
to 1 s soft + 1 s margin: the settings refuse a visibility timeout below the longest hard
limit) and with kombu's restore sweep every second (``sweep_worker``). The job is sent
with per-message time limits of its own (60/90 s), as a client configured with longer
limits than this worker would send it, and runs for 7 s: kombu delivers it again while it
runs. The copy finds the job's lease held, is deferred, and once the job is final it is
dropped. One ``started`` event, attempts == 1, one success.

Quick: one 7 s job. Full (``-m slow``): three 25 s jobs at once, each redelivered ~5 times.
"""

from __future__ import annotations

import time

import pytest

from morag.services.jobs import TaskStatus
from tests.reliability.support import PROBE, audit, wait_all_final

SHORT_LIMITS = {
    **{f"{kind}_soft_time_limit": "1" for kind in ("default", "document", "web", "audio")},
    "video_soft_time_limit": "1",
    "hard_time_limit_margin": "1",
    "visibility_timeout": "3",
    "lease_seconds": "2",
}
VISIBILITY = 3


@pytest.mark.parametrize(
    ("jobs", "seconds"),
    [pytest.param(1, 7, id="quick"), pytest.param(3, 25, id="full", marks=pytest.mark.slow)],
)
def test_job_longer_than_visibility_timeout_runs_once(
    module_workers, submitter, report, jobs: int, seconds: int
) -> None:
    # One process more than there are long jobs: a redelivered copy finds a free process.
    worker = module_workers(
        "tests.reliability.sweep_worker", queues="celery", concurrency=jobs + 1, **SHORT_LIMITS
    )
    ids = [
        submitter.submit(
            PROBE,
            kwargs={"steps": seconds * 2, "step_seconds": 0.5},
            soft_time_limit=seconds + 60,
            time_limit=seconds + 90,
        )
        for _ in range(jobs)
    ]
    started = time.monotonic()
    records = wait_all_final(submitter.store, ids, timeout=seconds + 60)
    elapsed = time.monotonic() - started
    log = worker.log()
    # The run itself, and each copy delivered again (deferred while it ran, dropped after).
    again = ("deferring this delivery", "job not run")
    deliveries = {
        task_id: 1
        + sum(task_id in line and any(a in line for a in again) for line in log.splitlines())
        for task_id in ids
    }
    deferred = log.count("deferring this delivery")

    tally = audit(f"long-job/{jobs}x{seconds}s", submitter.store, ids, records)
    report.record(
        tally,
        visibility_timeout_s=VISIBILITY,
        job_seconds=seconds,
        deliveries=sorted(deliveries.values()),
        deferred_copies=deferred,
        wall_s=round(elapsed, 1),
    )
    assert tally.duplicated == 0 and tally.lost == 0, tally.problems
    for task_id in ids:
        info = records[task_id]
        assert info.status is TaskStatus.SUCCESS and info.attempts == 1, info
        assert (info.finished_at - info.started_at).total_seconds() > VISIBILITY
        assert deliveries[task_id] >= 2, "kombu never delivered the running job again"
    assert deferred >= jobs
