"""A/B of what recycling pool processes costs row 1's drain (tasks/pool.py).

morag keeps the seed's ``worker_max_tasks_per_child=1000``: a drain of row 1's 1,500
no-op jobs on two processes recycles 1-2 of them. Three morag workers (two processes
each) consume their own queue of one namespace: ``morag`` as configured, ``stock`` on
Celery's own prefork pool (``-P prefork``: an exit noticed before the process can be
reaped waits for the 5 s maintenance), ``never`` with no recycling. Their drains
alternate; per side the jobs/s and CPU µs per job (worker main, pool, Redis), medians,
and the medians of the paired ratios against ``morag``.

    PYTHONPATH=src:. .venv/bin/python -m bench.pool_recycle_ab --rounds 12
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench.infra import Bench
from bench.queue_rows import MoragSide, drain_once
from bench.stats import print_paired

SIDES = {
    "morag": [],
    "stock": ["--pool=prefork"],
    "never": ["--max-tasks-per-child=1000000000"],
}


class QueueSide(MoragSide):
    """morag's probe jobs, drained by one worker from its own queue."""

    def __init__(self, bench: Bench, worker: Any, queue: str) -> None:
        super().__init__(bench, worker, steps=1)
        self.name = self.queue = queue


def start_worker(bench: Bench, queue: str, options: list[str]) -> Any:
    """``celery worker`` on morag's app, with Celery's own options (``morag worker`` has
    none for the pool)."""
    name = f"{queue}-{bench.run_id}@localhost"
    argv = [sys.executable, "-m", "celery", "-A", "morag.core.celery_app", "worker"]
    argv += ["--concurrency=2", f"--hostname={name}", f"--queues={queue}", "--loglevel=INFO"]
    service = bench._start(queue, argv + options, bench.child_env(bench.morag_env()))
    service.hostname = name  # type: ignore[attr-defined]
    bench.wait_morag_worker(service)
    return service


def drain(side: QueueSide, n: int, redis_pid: int) -> dict[str, float]:
    """Row 1's drain on ``side``'s queue: jobs/s, CPU µs per job in all and by process."""
    rate, cpu = drain_once(side, n, redis_pid)
    cpu.pop("redis_commands")
    return {"jobs/s": rate, "cpu µs/job": sum(cpu.values()), **cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=1500, help="jobs per drain (row 1's)")
    args = parser.parse_args()
    bench = Bench()
    try:
        bench.start_redis()
        redis_pid = bench.redis_server.process.pid
        sides = [QueueSide(bench, start_worker(bench, q, o), q) for q, o in SIDES.items()]
        for side in sides:
            drain(side, 200, redis_pid)  # warm-up
        results: dict[str, list[dict[str, float]]] = {side.name: [] for side in sides}
        for round_ in range(args.rounds):
            for side in sides[round_ % 3 :] + sides[: round_ % 3]:  # rotate the order
                results[side.name].append(drain(side, args.jobs, redis_pid))
        metrics = ["jobs/s", "cpu µs/job", "worker_main", "pool_children", "redis"]
        for other in ("stock", "never"):
            print_paired(results, "morag", other, metrics)
    finally:
        bench.close()


if __name__ == "__main__":
    main()
