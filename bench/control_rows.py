"""Rows 6 and 7: cancelling running jobs, and recovering a job whose worker was killed.

Row 6: a worker with ONE pool process runs a long ``probe``; a short follow-up job waits
behind it in the queue (prefetch 1 + acks_late: nothing else is reserved). The clock
starts at the cancel request (the API's ``DELETE /api/v1/ingest/{id}`` when it exists,
else ``task_manager.cancel``) and stops at the follow-up's ``started_at``: the request
freed the worker's slot. Two kinds of running job:
- cooperative: progress every 0.1 s (the cancel flag is seen at the next progress write);
- blocking: one 120-s step with no progress (only the revoke broadcast's SIGTERM stops it).

Row 7: a worker (one pool process, default settings: lease 30 s, recovery every 5 s) runs
a 5-s job; the worker's whole process group is SIGKILLed mid-job and a new worker starts at
once; timed from the kill to the job's success. Baseline: Celery's own redelivery (the same
kill on a bare Celery worker, restarted at once) is bounded below by the visibility timeout
(1 h by default); it is watched for the whole of morag's measurement and reported as
"not redelivered within <cap>".
"""

from __future__ import annotations

import random
import signal
import threading
import time
from datetime import datetime
from typing import Any

from bench.infra import Bench, wait_for
from bench.report import Row
from bench.stats import percentile, summary


def _record(bench: Bench, task_id: str, *fields: str) -> list[bytes | None]:
    return bench.client().hmget(f"{bench.morag_ns}:job:{task_id}", *fields)


def _epoch(value: bytes | None) -> float | None:
    return datetime.fromisoformat(value.decode()).timestamp() if value else None


class Canceller:
    def __init__(self, api_base: str | None) -> None:
        import httpx

        self.api_base = api_base
        self.http = httpx.Client(base_url=api_base, timeout=10) if api_base else None
        self.via = "API DELETE /api/v1/ingest/{id}" if api_base else "task_manager.cancel"

    def cancel(self, task_id: str) -> None:
        if self.http is not None:
            response = self.http.delete(f"/api/v1/ingest/{task_id}")
            if response.status_code >= 300:
                raise RuntimeError(f"cancel refused: {response.status_code} {response.text}")
        else:
            from morag.services.task_manager import task_manager

            task_manager.cancel(task_id)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()


def _cancel_sample(bench: Bench, canceller: Canceller, kwargs: dict[str, Any]) -> float:
    from morag.tasks.system_tasks import probe

    long_id = probe.apply_async(kwargs=kwargs).id
    wait_for(
        lambda: _record(bench, long_id, "state")[0] in (b"started", b"progress"),
        30,
        "the long job to start",
        interval=0.01,
    )
    # Well inside the job, at a random moment: Celery's pool maintenance runs on a 5-s
    # timer, and a fixed cadence would sample one phase of it only.
    time.sleep(random.uniform(0.2, 1.0))
    follow_id = probe.apply_async(kwargs={"steps": 0}).id
    requested = time.time()
    canceller.cancel(long_id)
    started = wait_for(
        lambda: _epoch(_record(bench, follow_id, "started_at")[0]),
        30,
        "the follow-up job to start",
        interval=0.005,
    )
    wait_for(
        lambda: _record(bench, long_id, "state")[0] == b"revoked",
        30,
        "the cancelled job to be revoked",
    )
    return started - requested


def _bare_cancel_samples(bench: Bench, count: int) -> list[float]:
    """Bare Celery: revoke(terminate=True) of a blocking task, until a queued empty task
    behind it has run (its result is stored) on a worker with one pool process."""
    worker = bench.start_bare_worker(1, results=True)
    app = bench.bare_app(results=True)
    client = bench.client()
    ns = bench.bare_ns(True)
    samples = []
    try:
        for _ in range(count):
            job = app.tasks["bench.sleep"].apply_async(args=(120.0,))
            wait_for(lambda: client.hlen(f"{ns}unacked") == 1, 30, "the bare job to start")
            time.sleep(random.uniform(0.2, 1.0))  # as for morag: a random phase
            follow = app.tasks["bench.noop"].apply_async()
            requested = time.perf_counter()
            app.control.revoke(job.id, terminate=True, signal="SIGTERM")
            follow.get(timeout=30)
            samples.append(time.perf_counter() - requested)
    finally:
        bench.stop(worker)
        bench.flush_bare()
    return samples


def run_cancel(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    from bench.api_rows import ensure_api

    ensure_api(bench)
    worker = bench.start_morag_worker(1, queues="celery")
    canceller = Canceller(bench.shared["api_base"] if bench.shared["api_has_cancel"] else None)
    variants = {
        "cooperative": {"steps": 100000, "step_seconds": 0.1},
        "blocking": {"steps": 1, "step_seconds": 120.0},
    }
    rows = []
    try:
        for name, kwargs in variants.items():
            p50s, p99s, samples_all = [], [], []
            for _ in range(cfg["reps"]):
                samples = [
                    _cancel_sample(bench, canceller, kwargs) for _ in range(cfg["cancel_samples"])
                ]
                samples_all.extend(samples)
                p50s.append(percentile(samples, 50))
                p99s.append(percentile(samples, 99))
            p99 = summary(p99s, 3)
            rows.append(
                Row(
                    key=f"6{'a' if name == 'cooperative' else 'b'}",
                    figure=f"cancel latency p99 of a running job ({name}), request → worker "
                    "slot free",
                    unit="s",
                    value=p99,
                    target="p99 ≤ 2 s",
                    met=p99["median"] is not None and p99["median"] <= 2.0,
                    notes=f"p50 {summary(p50s, 3)['median']} s; {cfg['cancel_samples']} cancels "
                    f"per repetition via {canceller.via}; job: probe{kwargs}; worker "
                    f"concurrency 1; all {len(samples_all)} samples (s): "
                    f"{sorted(round(x, 2) for x in samples_all)}.",
                    details={
                        "p50": summary(p50s, 3),
                        "samples": [round(x, 3) for x in samples_all],
                    },
                )
            )
    finally:
        canceller.close()
        bench.stop(worker)
        bench.flush_morag()
    bare_p50, bare_p99 = [], []
    for _ in range(cfg["reps"]):
        samples = _bare_cancel_samples(bench, cfg["cancel_samples"])
        bare_p50.append(percentile(samples, 50))
        bare_p99.append(percentile(samples, 99))
    for row in rows:
        row.baseline_name = "bare Celery revoke(terminate=True) of a blocking task, p99"
        row.baseline = summary(bare_p99, 3)
        row.details["bare_p50"] = summary(bare_p50, 3)
        row.notes += (
            f" Bare Celery p50: {summary(bare_p50, 3)['median']} s. A pool process killed by "
            "the terminate is replaced at once only if it is already reapable when its "
            "sentinel fires; otherwise at the pool's next 5-s maintenance tick (Celery "
            "AsynPool), hence latencies up to ~5 s on both sides."
        )
    return rows


class _BareRedelivery(threading.Thread):
    """Kill a bare worker mid-job, restart it, and watch for the job's result."""

    def __init__(self, bench: Bench) -> None:
        super().__init__(daemon=True)
        self.bench = bench
        self.app = bench.bare_app(results=True)
        self.killed_at = 0.0
        self.completed_after: float | None = None
        self._halt = threading.Event()

    def prepare(self) -> None:
        worker = self.bench.start_bare_worker(1, results=True)
        self.task_id = self.app.tasks["bench.sleep"].apply_async(args=(5.0,)).id
        ns = self.bench.bare_ns(True)
        client = self.bench.client()
        wait_for(lambda: client.hlen(f"{ns}unacked") == 1, 30, "the bare job to be delivered")
        time.sleep(1.0)
        worker.kill_group(signal.SIGKILL)
        self.killed_at = time.monotonic()
        self.bench.stop(worker)
        self.bench.start_bare_worker(1, results=True)

    def run(self) -> None:
        key = f"{self.bench.bare_ns(True)}celery-task-meta-{self.task_id}"
        client = self.bench.client()
        while not self._halt.is_set():
            if client.exists(key):
                self.completed_after = time.monotonic() - self.killed_at
                return
            self._halt.wait(0.2)

    def stop(self) -> float:
        self._halt.set()
        self.join(5)
        return time.monotonic() - self.killed_at


def run_recovery(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    from morag.core.config import settings
    from morag.tasks.system_tasks import probe

    bare = _BareRedelivery(bench)
    bare.prepare()
    bare.start()
    times, redelivered = [], []
    try:
        for _ in range(cfg["reps"]):
            bench.flush_morag()
            worker = bench.start_morag_worker(1, queues="celery")
            task_id = probe.apply_async(kwargs={"steps": 20, "step_seconds": 0.25}).id
            wait_for(
                lambda tid=task_id: _record(bench, tid, "state")[0] in (b"started", b"progress"),
                30,
                "the job to start",
            )
            time.sleep(1.0)
            worker.kill_group(signal.SIGKILL)
            killed = time.monotonic()
            bench.stop(worker)
            bench.start_morag_worker(1, queues="celery", wait=False)
            wait_for(
                lambda tid=task_id: _record(bench, tid, "attempts")[0] == b"2",
                cfg["recovery_timeout"],
                "the job to be delivered again",
                interval=0.05,
            )
            redelivered.append(time.monotonic() - killed)
            wait_for(
                lambda tid=task_id: _record(bench, tid, "state")[0] == b"success",
                cfg["recovery_timeout"],
                "the recovered job to succeed",
                interval=0.05,
            )
            times.append(time.monotonic() - killed)
            for service in list(bench.services):
                if service.name.startswith("mw"):
                    bench.stop(service)
    finally:
        cap = bare.stop()
        for service in list(bench.services):
            if service.name.startswith(("mw", "bw")):
                bench.stop(service)
        bench.flush_morag()
        bench.flush_bare()
    value = summary(times, 1)
    if bare.completed_after is not None:
        baseline_text = f"redelivered after {bare.completed_after:.0f} s"
        baseline = summary([bare.completed_after], 0)
    else:
        baseline_text = (
            f"not redelivered within {cap:.0f} s (watched); ≥ 3,600 s by construction "
            "(visibility_timeout 1 h)"
        )
        baseline = {
            "median": None,
            "min": None,
            "max": None,
            "n": 0,
            "values": [],
            "lower_bound_s": 3600,
            "watched_s": round(cap),
        }
    return [
        Row(
            key="7",
            figure="recovery after SIGKILL of a worker mid-job (kill → job succeeded, a new "
            "worker started at once)",
            unit="s",
            value=value,
            baseline_name="bare Celery, defaults",
            baseline=baseline,
            target="≤ 60 s",
            met=value["median"] is not None and value["max"] <= 60,
            notes=f"morag defaults: lease {settings.lease_seconds:.0f} s, recovery every "
            f"{settings.recovery_interval:.0f} s; job delivered again after "
            f"{summary(redelivered, 1)['median']} s (median). Baseline: {baseline_text}.",
            details={"redelivered_after_s": summary(redelivered, 1), "bare": baseline_text},
        )
    ]
