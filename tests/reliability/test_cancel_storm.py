"""Scenario 6: a cancel storm.

Two workers (two processes each) run 2-second probe jobs from a queue of 200. While four
run, all 200 are cancelled at once from 8 threads (``task_manager.cancel``: the record's
cancel flag, then a revoke broadcast, with terminate for running ones). Afterwards: no
cancelled job ends SUCCESS, every one is final, both workers still announce themselves and
run new jobs, and nothing stays in flight (slots freed, queues empty).

Quick: 200 jobs. Full (``-m slow``): 1,000 jobs, cancelled from 16 threads.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from morag.services.jobs import RUNNING_STATES, TaskStatus
from morag.services.task_manager import task_manager
from tests.harness import wait_for
from tests.reliability.support import audit, wait_all_final


@pytest.mark.parametrize(
    ("jobs", "threads"),
    [pytest.param(200, 8, id="quick"), pytest.param(1000, 16, id="full", marks=pytest.mark.slow)],
)
def test_cancel_storm(workers, submitter, report, jobs: int, threads: int) -> None:
    pool = [workers.start(queues="celery", concurrency=2) for _ in range(2)]
    ids = [submitter.probe(steps=20, step_seconds=0.1) for _ in range(jobs)]
    wait_for(
        lambda: (
            sum(1 for i in submitter.store.get_many(ids) if i and i.status in RUNNING_STATES) >= 4
        ),
        30,
        "four jobs to run",
    )

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as executor:
        outcomes = dict(zip(ids, executor.map(task_manager.cancel, ids), strict=True))
    cancel_s = time.monotonic() - started
    records = wait_all_final(submitter.store, ids, timeout=60)
    final_s = time.monotonic() - started

    by_outcome: dict[str, int] = {}
    for outcome in outcomes.values():
        by_outcome[outcome.outcome] = by_outcome.get(outcome.outcome, 0) + 1
    cancelled = [i for i in ids if outcomes[i].outcome in ("revoked", "cancelling")]
    succeeded_after_cancel = [
        i for i in cancelled if records[i] and records[i].status is TaskStatus.SUCCESS
    ]

    # The workers are healthy: alive, announced, and they run new work on every process.
    registry = task_manager.registry
    names = {w.hostname for w in registry.live_workers()}
    followers = [submitter.probe(steps=2, step_seconds=0.05) for _ in range(8)]
    after = wait_all_final(submitter.store, followers, timeout=30)
    wait_for(lambda: task_manager.in_flight() == 0, 30, "no message left unacked")
    pending = task_manager.queue_lengths()["celery"]

    tally = audit(f"cancel-storm/{jobs}", submitter.store, ids, records)
    report.record(
        tally,
        cancel_outcomes=by_outcome,
        cancel_calls_s=round(cancel_s, 2),
        all_final_after_s=round(final_s, 2),
        succeeded_after_cancel=len(succeeded_after_cancel),
        workers_alive=sum(w.alive() for w in pool),
    )
    assert not succeeded_after_cancel, succeeded_after_cancel
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert tally.revoked == len(cancelled) and tally.failed == 0
    assert all(w.alive() for w in pool)
    assert len([n for n in names if n.startswith("w")]) >= 2, names
    assert all(after[i] and after[i].status is TaskStatus.SUCCESS for i in followers)
    assert pending == 0
