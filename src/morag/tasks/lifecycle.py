"""Worker start-up and shutdown hooks, and the signals that keep job records true.

- A forked pool child drops the Redis clients it inherited.
- A job terminated by ``revoke`` ends REVOKED; a job killed by the hard time limit ends
  FAILURE (Celery reports both in the worker's main process, where the task never ran).
- Each worker announces itself (services/workers.py), restores jobs held by dead
  workers (services/recovery.py) and dispatches owed webhooks (services/webhooks.py) from
  one maintenance thread.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import structlog
from celery import signals
from celery.exceptions import TimeLimitExceeded

from morag.core.config import MODALITY_QUEUES, settings
from morag.core.redis_conn import get_redis
from morag.services.jobs import TaskStatus, get_job_store, reset_job_stores, utcnow
from morag.services.workers import WorkerInfo, WorkerRegistry

logger = structlog.get_logger(__name__)


@signals.worker_process_init.connect
def _prepare_child(**_: Any) -> None:
    reset_job_stores()  # a forked child must not share its parent's Redis sockets
    media_queues = {MODALITY_QUEUES["audio"], MODALITY_QUEUES["video"]}
    if settings.preload_models and media_queues & set(_worker["queues"]):
        # Load the speech model at start-up, not inside the first job's time limit.
        from morag.processors.audio import load_whisper_model

        try:
            load_whisper_model(
                settings.whisper_model, settings.whisper_device, settings.whisper_compute_type
            )
        except Exception as exc:  # the jobs will fail with the reason; the worker stays up
            logger.error("could not load the speech model", error=str(exc))


@signals.task_revoked.connect
def _record_revoked(request: Any = None, terminated: bool = False, **_: Any) -> None:
    if request is None or not request.id:
        return
    message = "cancelled while running" if terminated else "cancelled before it started"
    get_job_store().finish(request.id, TaskStatus.REVOKED, message=message)
    logger.info("job revoked", task_id=request.id, terminated=terminated)


@signals.task_failure.connect
def _record_hard_timeout(
    task_id: str | None = None, exception: BaseException | None = None, sender: Any = None, **_: Any
) -> None:
    # Soft limits and errors are recorded by the task itself; a hard limit kills the child
    # before it can, so the main process records it.
    if task_id and isinstance(exception, TimeLimitExceeded):
        limit = getattr(sender, "time_limit", None)
        message = f"the job was killed at its hard time limit of {limit} s"
        get_job_store().finish(
            task_id,
            TaskStatus.FAILURE,
            message=message,
            error_type="TimeLimitExceeded",
            error_message=message,
        )


@signals.celeryd_after_setup.connect
def _remember_worker(sender: str = "", instance: Any = None, **_: Any) -> None:
    queues = sorted(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    _worker.update(
        hostname=sender,
        queues=queues,
        concurrency=int(instance.concurrency or 0),
        started_at=utcnow().isoformat(),
    )


@signals.worker_ready.connect
def _start_maintenance(sender: Any = None, **_: Any) -> None:
    from morag.services.recovery import RecoveryLoop
    from morag.services.webhooks import WebhookOutbox, celery_publisher

    registry = WorkerRegistry(get_redis(settings.redis_url), settings.key_prefix)
    recovery = RecoveryLoop(
        sender.app,
        get_job_store(),
        interval=settings.recovery_interval,
        grace_seconds=settings.recovery_grace_seconds,
    )
    outbox = WebhookOutbox(
        get_redis(settings.redis_url), settings.key_prefix, celery_publisher(sender.app)
    )
    _maintenance.append(_Maintenance(registry, recovery, outbox))
    _maintenance[-1].start()


@signals.worker_shutting_down.connect
def _stop_maintenance(**_: Any) -> None:
    for loop in _maintenance:
        loop.stop()


class _Maintenance(threading.Thread):
    """Every ``recovery_interval``: announce this worker, restore jobs of dead ones,
    send the webhooks owed by jobs that ended."""

    def __init__(self, registry: WorkerRegistry, recovery: Any, outbox: Any = None) -> None:
        super().__init__(name="morag-maintenance", daemon=True)
        self.registry = registry
        self.recovery = recovery
        self.outbox = outbox
        self._stopped = threading.Event()

    def run(self) -> None:
        interval = settings.recovery_interval
        while not self._stopped.is_set():
            try:
                self.registry.announce(
                    WorkerInfo(pid=os.getpid(), seen_at=utcnow().isoformat(), **_worker),
                    ttl_seconds=3 * interval,
                )
                self.recovery.run_once()
            except Exception as exc:  # Redis away: the next round tries again
                logger.warning("worker maintenance failed", error=str(exc))
            try:
                if self.outbox is not None:
                    self.outbox.dispatch()
            except Exception as exc:  # entries stay in the outbox for the next round
                logger.warning("webhook dispatch failed", error=str(exc))
            self._stopped.wait(interval)

    def stop(self) -> None:
        self._stopped.set()
        try:
            self.registry.withdraw(_worker["hostname"])
        except Exception as exc:
            logger.warning("could not withdraw worker", error=str(exc))


_worker: dict[str, Any] = {"hostname": "", "queues": [], "concurrency": 0, "started_at": ""}
_maintenance: list[_Maintenance] = []
