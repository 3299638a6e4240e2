"""Counting helpers for the reliability scenarios.

Each scenario submits jobs, injects a fault, waits (with a deadline) for every job to reach
a final state, then audits the job records and their histories:

* submitted  - jobs whose record was written and whose message was published
* completed  - SUCCESS;  failed - FAILURE;  revoked - REVOKED
* lost       - no record, or not final when the deadline passed
* duplicated - a job that ran more often than the faults explain (more ``started`` events
  than expected), or whose history holds more than one final event

"Exactly once" is judged on effects: the job record (with its result) is the job's only
effect, its first final state wins, and every run leaves one ``started`` event in the
history, so the number of ``started`` events is the number of times the job body began.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil
from celery import Celery

from morag.core.celery_app import create_celery_app
from morag.core.config import Settings
from morag.core.redis_conn import get_redis
from morag.services.ingestion.publisher import JobPublisher
from morag.services.jobs import FINAL_STATES, JobStore, TaskInfo, TaskStatus

PROBE = "morag.tasks.system_tasks.probe"


class Submitter:
    """Submits jobs the way the API does: job record first, then the message, by task name.

    It owns a Celery app and a job store built from its own ``Settings``, so a scenario can
    talk to a Redis other than the session's (the module-level ``celery_app`` and
    ``settings`` of the test process stay bound to the session Redis).
    """

    def __init__(self, cfg: Settings) -> None:
        self.settings = cfg
        self.app: Celery = create_celery_app(cfg)
        self.store = JobStore(get_redis(cfg.redis_url), cfg.key_prefix, 3600)
        self.publisher = JobPublisher(self.store, self.app)

    def submit(
        self,
        name: str = PROBE,
        *,
        kind: str = "system",
        kwargs: dict[str, Any] | None = None,
        extra: dict[str, str] | None = None,
        **options: Any,
    ) -> str:
        """Write the record (``extra``: record fields such as ``webhook_url``), then send."""
        return self.publisher.send(name, kind=kind, kwargs=kwargs or {}, extra=extra, **options)

    def probe(self, **kwargs: Any) -> str:
        return self.submit(PROBE, kwargs=kwargs)

    def close(self) -> None:
        self.app.close()


def settings_for(redis_url: str, namespace: str, **overrides: Any) -> Settings:
    """Settings of a stack on its own Redis and key namespace."""
    return Settings(
        _env_file=None,
        redis_url=redis_url,
        key_prefix=namespace,
        broker_namespace=f"{namespace}:",
        **overrides,
    )


def wait_all_final(
    store: JobStore, ids: list[str], timeout: float, interval: float = 0.1
) -> dict[str, TaskInfo | None]:
    """Poll until every job is final or the deadline passes; returns the last records seen."""
    deadline = time.monotonic() + timeout
    records: dict[str, TaskInfo | None] = {}
    pending = list(ids)
    while True:
        for task_id, info in zip(pending, _get_many(store, pending), strict=True):
            records[task_id] = info
        pending = [i for i in pending if not (records[i] and records[i].status in FINAL_STATES)]
        if not pending or time.monotonic() > deadline:
            return records
        time.sleep(interval)


def _get_many(store: JobStore, ids: list[str]) -> list[TaskInfo | None]:
    out: list[TaskInfo | None] = []
    for start in range(0, len(ids), 500):
        out.extend(store.get_many(ids[start : start + 500]))
    return out


def histories(store: JobStore, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    result: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        pipe = store.redis.pipeline(transaction=False)
        for task_id in chunk:
            pipe.lrange(store.keys.history(task_id), 0, -1)
        for task_id, raw in zip(chunk, pipe.execute(), strict=True):
            result[task_id] = [json.loads(item) for item in raw]
    return result


@dataclass
class Tally:
    """The counts of one scenario (or one round of it)."""

    scenario: str
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    revoked: int = 0
    lost: int = 0
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        for name in ("submitted", "completed", "failed", "revoked", "lost", "duplicated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems.extend(other.problems)

    def line(self) -> str:
        figures = " ".join(f"{k}={v}" for k, v in self.figures.items())
        return (
            f"{self.scenario}: submitted={self.submitted} completed={self.completed} "
            f"failed={self.failed} revoked={self.revoked} lost={self.lost} "
            f"duplicated={self.duplicated} {figures}"
        ).strip()


def audit(
    scenario: str,
    store: JobStore,
    ids: list[str],
    records: dict[str, TaskInfo | None],
    expected_starts: dict[str, int] | None = None,
) -> Tally:
    """Count outcomes and check every job's history against its record.

    ``expected_starts`` gives, per job, how many runs the injected faults explain (default
    1 for a job that ran, 0 for one that never started); more is a duplicate.
    """
    tally = Tally(scenario, submitted=len(ids))
    events = histories(store, ids)
    for task_id in ids:
        info = records.get(task_id)
        if info is None or info.status not in FINAL_STATES:
            tally.lost += 1
            state = info.status.value if info else "no record"
            tally.problems.append(f"{task_id}: not final ({state})")
            continue
        if info.status is TaskStatus.SUCCESS:
            tally.completed += 1
        elif info.status is TaskStatus.FAILURE:
            tally.failed += 1
        else:
            tally.revoked += 1
        # Transitions carry their state as their stage; other events (a webhook attempt)
        # repeat the job's current state under a stage of their own.
        history = [e for e in events[task_id] if e.get("stage") == e["state"]]
        starts = sum(1 for e in history if e["state"] == "started")
        finals = [e for e in history if e["state"] in ("success", "failure", "revoked")]
        expected = (expected_starts or {}).get(task_id, 1)
        if starts != info.attempts:
            tally.problems.append(f"{task_id}: {starts} started events, attempts={info.attempts}")
        if len(finals) != 1 or finals[0]["state"] != info.status.value:
            tally.duplicated += 1
            tally.problems.append(f"{task_id}: final events {[e['state'] for e in finals]}")
        elif starts > expected and info.status is not TaskStatus.REVOKED:
            tally.duplicated += 1
            tally.problems.append(f"{task_id}: started {starts} times, expected {expected}")
    return tally


def pid_of(info: TaskInfo | None) -> int | None:
    """The pid in a record's worker identity (``host:pid:boot``)."""
    if info is None or not info.worker:
        return None
    try:
        return int(info.worker.split(":")[1])
    except (IndexError, ValueError):
        return None


class RssSampler:
    """Samples the resident memory of process trees (a process and its children)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def watch(self, label: str, pid: int) -> None:
        self.pids[label] = pid

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for label, pid in list(self.pids.items()):
            try:
                root = psutil.Process(pid)
                rss = root.memory_info().rss + sum(
                    c.memory_info().rss for c in root.children(recursive=True)
                )
            except psutil.Error:
                continue
            self.peak[label] = max(self.peak.get(label, 0), rss)

    def peak_mib(self) -> dict[str, float]:
        return {label: round(rss / 2**20, 1) for label, rss in self.peak.items()}


def percentile(values: Iterable[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]
