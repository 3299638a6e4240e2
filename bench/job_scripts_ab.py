"""A/B of the job record's per-job writes: two versions of services/jobs.py, alternating.

Each round runs, for ``--jobs`` fresh ids, what a no-op job costs the record (``create``,
then the worker's ``start`` and ``finish`` with its held progress report, as the probe of
row 1 does) with one version's ``JobStore``, against one private embedded Redis. Per job
it reads the client's CPU (this process, ``start`` + ``finish`` only), Redis' own
``evalsha`` time (``INFO commandstats``) and the redis-server process's CPU. Rounds
alternate old/new so a loaded machine affects both alike; the medians and the median of
the paired new/old ratios are printed.

    PYTHONPATH=src:. .venv/bin/python -m bench.job_scripts_ab --old main --rounds 21
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import redis

from bench.infra import private_redis
from bench.stats import print_paired


def load_jobs_module(rev: str, workdir: Path) -> ModuleType:
    """services/jobs.py as committed at ``rev`` ("." for this tree), as its own module."""
    if rev == ".":
        path = Path(__file__).resolve().parent.parent / "src/morag/services/jobs.py"
    else:
        source = subprocess.run(
            ["git", "show", f"{rev}:src/morag/services/jobs.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = workdir / f"jobs_{rev.replace('/', '_')}.py"
        path.write_text(source)
    name = f"ab_jobs_{abs(hash((rev, str(path))))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def one_round(mod: ModuleType, client: redis.Redis, n: int, server: psutil.Process) -> dict:
    store = mod.JobStore(client, "ab", 3600)
    ids = [str(uuid.uuid4()) for _ in range(n)]
    for task_id in ids:
        store.create(task_id, kind="system", queue="celery", task_name="morag.probe")
    for task_id in ids[:5]:  # scripts loaded, connection warm
        store.start(task_id, worker="w:1:x", lease_seconds=60, max_attempts=3)
    client.config_resetstat()
    redis_before = sum(server.cpu_times()[:2])
    cpu_before = time.process_time()
    for task_id in ids[5:]:
        store.start(task_id, worker="w:1:x", lease_seconds=60, max_attempts=3, kind="system")
        report = mod.ProgressReport(1.0, "probing", "step 1 of 1", mod.utcnow(), {"step": 1})
        store.finish(
            task_id,
            mod.TaskStatus.SUCCESS,
            message="done",
            worker="w:1:x",
            summary={"steps": 1, "step_seconds": 0.0, "pid": 1},
            result={"steps": 1, "step_seconds": 0.0, "pid": 1},
            last_report=report,
        )
    client_us = (time.process_time() - cpu_before) / (n - 5) * 1e6
    redis_us = (sum(server.cpu_times()[:2]) - redis_before) / (n - 5) * 1e6
    stats = client.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    calls = sum(s["calls"] for k, s in stats.items() if k not in ("cmdstat_config",))
    inner = calls - evalsha.get("calls", 0)
    client.flushall()
    return {
        "client_us": client_us,
        "redis_cpu_us": redis_us,
        "evalsha_us": evalsha.get("usec", 0) / (n - 5),
        "inner_calls": inner / (n - 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main", help="git revision of the A side")
    parser.add_argument("--new", default=".", help="git revision of the B side (. = this tree)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        old, new = load_jobs_module(args.old, Path(tmp)), load_jobs_module(args.new, Path(tmp))
        with private_redis() as (_, client, proc):
            results: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
            for i in range(args.rounds):
                order = [("old", old), ("new", new)] if i % 2 == 0 else [("new", new), ("old", old)]
                for name, mod in order:
                    results[name].append(one_round(mod, client, args.jobs, proc))
    print_paired(results, "old", "new", ("client_us", "redis_cpu_us", "evalsha_us", "inner_calls"))


if __name__ == "__main__":
    main()
