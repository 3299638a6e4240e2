"""The Celery app: queues, routing and the settings that protect work.

Importing this module is cheap: task modules import their processors only when a task
runs, so the API can send tasks without loading speech models or media libraries.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery, Task
from kombu import Queue

from morag.core.broker import transport_for
from morag.core.config import ALL_QUEUES, DEFAULT_QUEUE, MODALITY_QUEUES, Settings, settings

logger = structlog.get_logger(__name__)

TASK_MODULES = [f"morag.tasks.{kind}_tasks" for kind in (*MODALITY_QUEUES, "system")]


def celery_config(cfg: Settings) -> dict[str, Any]:
    """Celery settings derived from morag's settings."""
    transport_options: dict[str, Any] = {"visibility_timeout": cfg.visibility_timeout}
    if cfg.broker_namespace:
        transport_options["global_keyprefix"] = cfg.broker_namespace
    broker_url, broker_transport = transport_for(cfg.celery_broker_url)
    return {
        "broker_url": broker_url,
        "broker_transport": broker_transport or None,
        "result_backend": cfg.celery_result_backend,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": dict(transport_options),
        "broker_connection_retry_on_startup": True,
        # Routing: one queue per modality; anything else goes to the default queue.
        "task_routes": {
            f"morag.tasks.{kind}_tasks.*": {"queue": queue}
            for kind, queue in MODALITY_QUEUES.items()
        },
        "task_queues": tuple(Queue(name, routing_key=name) for name in ALL_QUEUES),
        "task_default_queue": DEFAULT_QUEUE,
        # JSON only: a message can never run code on deserialisation.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "timezone": "UTC",
        "enable_utc": True,
        # The job record holds states and results (services/jobs.py), so Celery's result
        # writes would only duplicate them; the backend stays configured for AsyncResult.
        "task_ignore_result": True,
        "result_expires": 3600,
        "result_extended": True,
        # Nothing lost when a worker dies: ack after the work, requeue on a lost child,
        # fetch one message per process at a time.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Celery's prefork pool, replacing a recycled or terminated process at once.
        "worker_pool": "morag.tasks.pool:TaskPool",
        "worker_max_tasks_per_child": 1000,
        # Monitoring (Flower, `celery events`).
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }


def create_celery_app(cfg: Settings) -> Celery:
    app = Celery("morag", include=TASK_MODULES)
    app.conf.update(celery_config(cfg))
    return app


celery_app = create_celery_app(settings)


class BaseTask(Task):  # type: ignore[misc]
    """Base task: one structured log line per failure and retry (a success is logged once,
    as "job finished", by ProcessingTask)."""

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        logger.error(
            "task failed",
            task_id=task_id,
            task_name=self.name,
            error_type=type(exc).__name__,
            error=str(exc),
        )

    def on_retry(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        logger.warning(
            "task retrying",
            task_id=task_id,
            task_name=self.name,
            error=str(exc),
            retry_count=self.request.retries,
        )


celery_app.Task = BaseTask
