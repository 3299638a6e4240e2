"""Scenario 1: a worker killed mid-job, round after round.

Each round submits a handful of probe jobs to a worker with two pool processes, waits until
jobs run, SIGKILLs either the pool child running one of them or the whole worker (its
process group; then a new worker is started), and waits for every job to finish. A job the
killed process was running must run exactly once more (two ``started`` events, one
success); every other job exactly once. Recovery time is kill -> success of a hit job.

Quick: 3 rounds each (default run). Full: 20 rounds each (``-m slow``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from morag.services.jobs import RUNNING_STATES
from tests.harness import pool_children, wait_for
from tests.reliability.support import Tally, audit, percentile, pid_of, wait_all_final

JOBS_PER_ROUND = 6
WORKER_ENV = {"lease_seconds": "1.5"}  # a dead process's job is noticed 1.5 s after it died
ROUNDS = [pytest.param(3, id="quick"), pytest.param(20, id="full", marks=pytest.mark.slow)]


def _running_on(submitter, ids: list[str], pids: set[int]) -> set[str]:
    records = submitter.store.get_many(ids)
    return {
        task_id
        for task_id, info in zip(ids, records, strict=True)
        if info is not None and info.status in RUNNING_STATES and pid_of(info) in pids
    }


def _wait_running(submitter, ids: list[str], count: int) -> list:
    def running():
        infos = [i for i in submitter.store.get_many(ids) if i and i.status in RUNNING_STATES]
        return infos if len(infos) >= count else None

    return wait_for(running, 30, f"{count} jobs to run")


def _finish_round(submitter, ids, hit, killed_at, name, report_tally) -> list[float]:
    records = wait_all_final(submitter.store, ids, timeout=60)
    expected = {task_id: 2 if task_id in hit else 1 for task_id in ids}
    tally = audit(name, submitter.store, ids, records, expected)
    report_tally.add(tally)
    return [
        records[task_id].finished_at.timestamp() - killed_at
        for task_id in hit
        if records[task_id] is not None and records[task_id].finished_at is not None
    ]


def _conclude(report, tally: Tally, recoveries: list[float], rounds: int, started: float):
    report.record(
        tally,
        rounds=rounds,
        jobs_hit=len(recoveries),
        recovery_p50_s=round(percentile(recoveries, 0.5), 2),
        recovery_max_s=round(max(recoveries, default=0), 2),
        wall_s=round(time.monotonic() - started, 1),
    )
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert tally.failed == 0 and tally.completed == tally.submitted, tally.problems
    assert not tally.problems, tally.problems
    assert len(recoveries) >= rounds  # every round hit at least one running job


@pytest.mark.parametrize("rounds", ROUNDS)
def test_pool_child_killed_mid_job(workers, submitter, report, rounds: int) -> None:
    started = time.monotonic()
    worker = workers.start(queues="celery", concurrency=2, **WORKER_ENV)
    tally, recoveries = Tally(f"worker-kill/pool-child/{rounds}-rounds"), []
    for round_no in range(rounds):
        ids = [submitter.probe(steps=8, step_seconds=0.1) for _ in range(JOBS_PER_ROUND)]
        running = _wait_running(submitter, ids, 1)
        victim = pid_of(running[0])
        assert victim in pool_children(worker.pid), (victim, pool_children(worker.pid))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        hit = _running_on(submitter, ids, {victim})  # the dead child's record stays put
        assert hit, f"round {round_no}: the killed child ran none of this round's jobs"
        recoveries += _finish_round(submitter, ids, hit, killed_at, f"round {round_no}", tally)
        assert worker.alive(), worker.log()
    _conclude(report, tally, recoveries, rounds, started)


@pytest.mark.parametrize("rounds", ROUNDS)
def test_whole_worker_killed_mid_job(workers, submitter, report, rounds: int) -> None:
    started = time.monotonic()
    worker = workers.start(queues="celery", concurrency=2, **WORKER_ENV)
    tally, recoveries = Tally(f"worker-kill/whole-worker/{rounds}-rounds"), []
    for round_no in range(rounds):
        ids = [submitter.probe(steps=8, step_seconds=0.1) for _ in range(JOBS_PER_ROUND)]
        _wait_running(submitter, ids, 2)
        doomed = {worker.pid, *pool_children(worker.pid)}
        worker.kill(signal.SIGKILL)  # the process group: main process and pool children
        killed_at = time.time()
        hit = _running_on(submitter, ids, doomed)
        assert hit, f"round {round_no}: the killed worker ran none of this round's jobs"
        worker = workers.start(queues="celery", concurrency=2, **WORKER_ENV)
        recoveries += _finish_round(submitter, ids, hit, killed_at, f"round {round_no}", tally)
    _conclude(report, tally, recoveries, rounds, started)
