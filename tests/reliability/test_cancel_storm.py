"""Scenario 6: a cancel storm.

Two workers (two processes each) run short probe jobs from a queue. While four run, two
jobs in three are cancelled at once from 8 threads (``task_manager.cancel``: the record's
cancel flag, then a revoke broadcast, with terminate for running ones). Afterwards: no
cancelled job ends SUCCESS, every job is final, the jobs nobody cancelled succeed exactly
once (a terminate that hit the wrong process would show as a second start), both workers
still announce themselves and run new jobs, and nothing stays in flight.

Quick: 300 jobs, 200 cancelled. Full (``-m slow``): 1,500 jobs, 1,000 cancelled from 16
threads.
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
    [pytest.param(300, 8, id="quick"), pytest.param(1500, 16, id="full", marks=pytest.mark.slow)],
)
def test_cancel_storm(workers, submitter, report, jobs: int, threads: int) -> None:
    pool = [workers.start(queues="celery", concurrency=2) for _ in range(2)]
    ids = [submitter.probe(steps=4, step_seconds=0.05) for _ in range(jobs)]
    targets = [task_id for n, task_id in enumerate(ids) if n % 3 != 2]
    spared = [task_id for n, task_id in enumerate(ids) if n % 3 == 2]
    wait_for(
        lambda: (
            sum(1 for i in submitter.store.get_many(ids) if i and i.status in RUNNING_STATES) >= 4
        ),
        30,
        "four jobs to run",
    )

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as executor:
        outcomes = dict(zip(targets, executor.map(task_manager.cancel, targets), strict=True))
    cancel_s = time.monotonic() - started
    records = wait_all_final(submitter.store, ids, timeout=120)
    final_s = time.monotonic() - started

    by_outcome: dict[str, int] = {}
    for outcome in outcomes.values():
        by_outcome[outcome.outcome] = by_outcome.get(outcome.outcome, 0) + 1
    cancelled = [i for i in targets if outcomes[i].outcome in ("revoked", "cancelling")]
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

    once = [i for i in spared if records[i].status is TaskStatus.SUCCESS]
    once = [i for i in once if records[i].attempts == 1]
    tally = audit(f"cancel-storm/{len(targets)}-of-{jobs}", submitter.store, ids, records)
    report.record(
        tally,
        cancel_outcomes=by_outcome,
        cancel_calls_s=round(cancel_s, 2),
        all_final_after_s=round(final_s, 2),
        succeeded_after_cancel=len(succeeded_after_cancel),
        spared_succeeded_once=sum(
            1
            for i in spared
            if records[i].status is TaskStatus.SUCCESS and records[i].attempts == 1
        ),
        workers_alive=sum(w.alive() for w in pool),
    )
    assert not succeeded_after_cancel, succeeded_after_cancel
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert tally.revoked == len(cancelled) and tally.failed == 0
    for task_id in spared:  # nobody cancelled these: each ran once, undisturbed
        assert records[task_id].status is TaskStatus.SUCCESS, records[task_id]
        assert records[task_id].attempts == 1, records[task_id]
    assert all(w.alive() for w in pool)
    assert len([n for n in names if n.startswith("w")]) >= 2, names
    assert all(after[i] and after[i].status is TaskStatus.SUCCESS for i in followers)
    assert pending == 0
