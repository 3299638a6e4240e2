"""Task lifecycle as the seed named it: status, progress, cancellation, active tasks, stats.

Status comes from the job record (services/jobs.py), never from Celery's PENDING, which
Celery also reports for ids it never saw. Queue statistics count messages on the broker
itself and read consumers from the worker registry, so they answer in one or two Redis
round trips; remote-control calls (active tasks) have a short timeout and a brief cache.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog
from celery import Celery
from celery.result import AsyncResult

from morag.core.celery_app import celery_app
from morag.core.config import ALL_QUEUES, Settings, settings
from morag.core.errors import NotFoundError
from morag.core.redis_conn import get_redis
from morag.services.jobs import (
    JobStore,
    Outcome,
    TaskInfo,
    TaskStatus,
)
from morag.services.workers import WorkerRegistry

__all__ = ["TaskInfo", "TaskManager", "TaskStatus", "status_from_celery_state", "task_manager"]

logger = structlog.get_logger(__name__)

# Every state Celery (or a task) can report, mapped on purpose.
_CELERY_STATES: dict[str, TaskStatus] = {
    "PENDING": TaskStatus.PENDING,  # queued, or unknown to Celery
    "RECEIVED": TaskStatus.PENDING,  # reserved by a worker, not started
    "STARTED": TaskStatus.STARTED,
    "PROGRESS": TaskStatus.PROGRESS,
    "RETRY": TaskStatus.RETRY,
    "SUCCESS": TaskStatus.SUCCESS,
    "FAILURE": TaskStatus.FAILURE,
    "REJECTED": TaskStatus.FAILURE,  # rejected without requeue: it will not run
    "REVOKED": TaskStatus.REVOKED,
    "IGNORED": TaskStatus.REVOKED,  # morag raises Ignore only for jobs it must not run
}

# kombu's Redis transport keeps priorities 3, 6 and 9 in lists beside the queue's own.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)


def status_from_celery_state(state: str) -> TaskStatus:
    """Map a Celery state; a custom state is a running task's own progress report."""
    return _CELERY_STATES.get(state.upper(), TaskStatus.PROGRESS)


class TaskManager:
    """Manages task lifecycle and status tracking."""

    def __init__(
        self, app: Celery = celery_app, cfg: Settings = settings, store: JobStore | None = None
    ) -> None:
        self.celery_app = app
        self.settings = cfg
        self.redis = get_redis(cfg.redis_url)
        self.store = store or JobStore(self.redis, cfg.key_prefix, cfg.result_retention_seconds)
        self.registry = WorkerRegistry(self.redis, cfg.key_prefix)
        self._inspect_lock = threading.Lock()
        self._inspect_cache: dict[str, tuple[float, Any]] = {}

    # -- status -----------------------------------------------------------------------------
    def get_task_status(self, task_id: str) -> TaskInfo:
        """The job's status; ``NotFoundError`` for an id that was never submitted."""
        info = self.store.get(task_id)
        if info is not None:
            return info
        # No record: only a result stored by Celery itself (a task sent by another client
        # with results on) can say more; PENDING there means "never seen".
        state = AsyncResult(task_id, app=self.celery_app).state
        if state == "PENDING":
            raise NotFoundError(f"no job with id {task_id}")
        return TaskInfo(task_id=task_id, status=status_from_celery_state(state))

    def update_task_progress(
        self,
        task_id: str,
        progress: float,
        message: str | None = None,
        metadata: dict[str, Any] | None = None,
        stage: str = "processing",
    ) -> str:
        """Record progress of a running job, with ``metadata`` kept in its record and
        history (answers ok, cancel or stop:<state>)."""
        return self.store.progress(
            task_id,
            progress,
            stage,
            message or stage,
            worker="",
            lease_seconds=self.settings.lease_seconds,
            metadata=metadata,
        )

    # -- cancellation -----------------------------------------------------------------------
    def cancel(self, task_id: str) -> Outcome:
        """Cancel a job: ``revoked`` (was queued), ``cancelling`` (is running), ``final``.

        The flag in the record stops a queued job even if no worker hears the revoke
        broadcast; the broadcast terminates a running one within about a second.
        """
        outcome = self.store.request_cancel(task_id)
        if outcome.outcome == "missing":
            raise NotFoundError(f"no job with id {task_id}")
        if outcome.outcome != "final":
            self.celery_app.control.revoke(
                task_id, terminate=outcome.outcome == "cancelling", signal="SIGTERM"
            )
            logger.info("job cancel requested", task_id=task_id, outcome=outcome.outcome)
        return outcome

    def cancel_task(self, task_id: str) -> bool:
        """The seed's form: True when the job was stopped, False when it had finished."""
        return self.cancel(task_id).outcome != "final"

    # -- workers and queues ---------------------------------------------------------------------
    def _inspect(self, method: str) -> dict[str, Any]:
        """A remote-control reply, bounded by ``inspect_timeout`` and cached briefly."""
        now = time.monotonic()
        with self._inspect_lock:
            cached = self._inspect_cache.get(method)
            if cached and now - cached[0] < self.settings.inspect_cache_seconds:
                return cached[1]
        names = [worker.hostname for worker in self.registry.live_workers()]
        if not names:
            reply: dict[str, Any] = {}  # nobody would answer; do not wait for the timeout
        else:
            # Addressed to the live workers and done once each has answered: without a
            # destination and limit, every call waits out the whole timeout.
            inspector = self.celery_app.control.inspect(
                destination=names, limit=len(names), timeout=self.settings.inspect_timeout
            )
            reply = getattr(inspector, method)() or {}
        with self._inspect_lock:
            self._inspect_cache[method] = (time.monotonic(), reply)
        return reply

    def get_active_tasks(self) -> list[dict[str, Any]]:
        """Tasks running now, on every worker that answers."""
        tasks = []
        for worker, active in self._inspect("active").items():
            for task in active:
                tasks.append({**task, "worker": worker})
        return tasks

    def queue_lengths(self) -> dict[str, int]:
        """Messages waiting on each queue, counted on the broker (priority lists included)."""
        ns = self.settings.broker_namespace
        pipe = self.redis.pipeline(transaction=False)
        for queue in ALL_QUEUES:
            pipe.llen(f"{ns}{queue}")
            for step in _PRIORITY_STEPS:
                pipe.llen(f"{ns}{queue}{_PRIORITY_SEP}{step}")
        counts = pipe.execute()
        per_queue = 1 + len(_PRIORITY_STEPS)
        return {
            queue: sum(counts[i * per_queue : (i + 1) * per_queue])
            for i, queue in enumerate(ALL_QUEUES)
        }

    def in_flight(self) -> int:
        """Messages delivered to workers and not yet acknowledged (running or reserved)."""
        return int(self.redis.hlen(f"{self.settings.broker_namespace}unacked"))

    def get_queue_stats(self, *, include_active: bool = True) -> dict[str, Any]:
        """Pending messages, consumers and workers per queue, in-flight and active work."""
        lengths = self.queue_lengths()
        workers = self.registry.live_workers()
        consumers = WorkerRegistry.consumers_by_queue(workers, list(ALL_QUEUES))
        active = self.get_active_tasks() if include_active and workers else []
        return {
            "queues": {
                queue: {
                    "pending": lengths.get(queue, 0),
                    "consumers": len(consumers[queue]),
                    "workers": consumers[queue],
                }
                for queue in ALL_QUEUES
            },
            "pending_total": sum(lengths.values()),
            "in_flight": self.in_flight(),
            "active_tasks": len(active),
            "workers": [w.hostname for w in workers],
            "worker_details": WorkerRegistry.describe(workers),
        }


task_manager = TaskManager()
