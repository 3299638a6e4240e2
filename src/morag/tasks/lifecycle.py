"""Worker start-up and shutdown hooks, and the signals that keep job records true.

- A forked pool child drops the Redis clients it inherited and freezes what it inherited
  out of the garbage collector's sight.
- A job terminated by ``revoke`` ends REVOKED; a job killed by the hard time limit ends
  FAILURE (Celery reports both in the worker's main process, where the task never ran).
- The main process freezes what it loaded, so forking a replacement pool process costs
  no copy-on-write storm (the pool replaces an exited process at once: tasks/pool.py).
- Task events (Flower, ``celery events``) leave in batches every ``EVENT_FLUSH_SECONDS``
  instead of one publish per event; a recycled pool process sends the task-sent events
  of its retries before it exits (core/sent_events.py).
- A job's ack is written to Redis with the next delivery's bookkeeping, or after
  ``ACK_DELAY_SECONDS`` when none comes (core/broker.py).
- Each worker announces itself (services/workers.py) and restores jobs held by dead
  workers (services/recovery.py) from one maintenance thread, which also hands owed
  webhooks to the worker's delivery threads (services/webhooks.py) and deletes the files
  of ended jobs and prunes the job index (services/retention.py), outside the pool that
  runs jobs.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from typing import Any

import structlog
from celery import bootsteps, signals
from celery.concurrency import prefork, solo
from celery.exceptions import TimeLimitExceeded

from morag.core import broker
from morag.core.celery_app import celery_app
from morag.core.config import MODALITY_QUEUES, settings
from morag.core.logging import configure_structlog, escape_stdlib_logs
from morag.core.private_files import keep_files_private
from morag.core.redis_conn import get_redis
from morag.core.sent_events import BATCH_LIMIT, EVENT_FLUSH_SECONDS, sent_event_batcher
from morag.services.jobs import TaskStatus, get_job_store, reset_job_stores, utcnow
from morag.services.workers import WorkerInfo, WorkerRegistry

logger = structlog.get_logger(__name__)


@signals.after_setup_logger.connect
def _configure_structlog(loglevel: Any = None, logger: Any = None, **_: Any) -> None:
    """Job log lines go straight to the real stderr: Celery redirects ``sys.stdout`` and
    ``sys.stderr`` into its logger, and structlog's default printer would have each line
    formatted twice (and at warning level). Celery's own lines are escaped as ours are."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel
    configure_structlog(str(level or settings.log_level), settings.log_json, sys.__stderr__)
    if logger is not None:
        escape_stdlib_logs(logger)
    if logging.getLevelName(str(level or settings.log_level).upper()) != logging.DEBUG:
        # Celery's "Task ... received" (main process) and "Task ... succeeded" (pool) lines
        # say again what the job record and "job finished" say: one line per job and
        # process (~25 µs each), kept at debug; their warnings and errors still show.
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)


@signals.after_setup_task_logger.connect
def _escape_task_logs(logger: Any = None, **_: Any) -> None:
    if logger is not None:
        escape_stdlib_logs(logger)


@signals.worker_init.connect
def _keep_files_private(**_: Any) -> None:
    """Uploads, downloads and keyframes this worker writes are 0600 (core/private_files.py)."""
    keep_files_private(settings)


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
    if settings.preload_models and set(MODALITY_QUEUES.values()) & set(_worker["queues"]):
        # Every modality's job embeds its chunks: load the embedding model at start too.
        from morag.processors.embedding import load_embedder

        try:
            load_embedder(
                settings.embedding_model_path or None,
                settings.embedding_batch_size,
                settings.embedding_threads,
            )
        except Exception as exc:  # the jobs will fail with the reason; the worker stays up
            logger.error("could not load the embedding model", error=str(exc))
    # Everything loaded so far (modules, the model) lives as long as the process: out of
    # the collector's sight it is never scanned again, and its pages stay shared.
    gc.freeze()


@signals.worker_process_shutdown.connect
def _flush_child_events(**_: Any) -> None:
    # A pool process leaves with os._exit: atexit hooks never run.
    sent_event_batcher(celery_app).flush()


class TaskEventBatching(bootsteps.StartStopStep):  # type: ignore[misc]
    """Publish the worker's task events in batches, at most ``EVENT_FLUSH_SECONDS`` late.

    Celery buffers task events but flushes the buffer on the next turn of the event loop,
    which under load is one Redis publish per event, three per job. Events are a live
    feed for monitors
    (Flower, ``celery events``), not morag's record, so a tenth of a second is no loss;
    a full buffer (``BATCH_LIMIT`` events, not Celery's 24: at 600 jobs/s a batch of 24
    left every 13 ms, a publish per 8 jobs) still goes out at once, and the rest at
    shutdown.
    """

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._flush_due = False

    def start(self, c: Any) -> None:
        self._flush_due = False  # a timer set before a reconnect may be gone
        dispatcher = c.event_dispatcher
        if dispatcher is None or c.hub is None or dispatcher.on_send_buffered is None:
            return  # no event loop: Celery publishes each event itself

        def flush() -> None:
            self._flush_due = False
            current = c.event_dispatcher
            if current is not None:
                current.flush()

        def schedule_flush() -> None:
            if not self._flush_due:
                self._flush_due = True
                c.hub.call_later(EVENT_FLUSH_SECONDS, flush)

        dispatcher.on_send_buffered = schedule_flush
        dispatcher.buffer_limit = BATCH_LIMIT

    def stop(self, c: Any) -> None:
        if c.event_dispatcher is not None:
            try:
                c.event_dispatcher.flush()
            except Exception as exc:  # the broker is gone: these events are lost, as Celery's
                logger.warning("task events not sent at shutdown", error=str(exc))


celery_app.steps["consumer"].add(TaskEventBatching)


class DeferredAcks(bootsteps.StartStopStep):  # type: ignore[misc]
    """Let each delivery's bookkeeping write carry the acks before it (core/broker.py):
    one Redis call per job in the main process instead of two. Only with morag's
    transport and an event loop, whose timer writes an ack no delivery took along, and a
    pool that acks in the loop's thread (a thread pool acks from its threads, and the
    loop's timers are not thread-safe)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    @staticmethod
    def acks_in_the_loop(pool: Any) -> bool:
        """Whether ``pool`` acks in the event loop's thread: Celery's prefork pool (and
        morag's, tasks/pool.py, made from it) and the solo pool."""
        return isinstance(pool, (prefork.TaskPool, solo.TaskPool))

    def start(self, c: Any) -> None:
        qos = getattr(getattr(c.task_consumer, "channel", None), "qos", None)
        if c.hub is not None and self.acks_in_the_loop(c.pool) and isinstance(qos, broker.QoS):
            qos.defer_acks(c.hub.call_later)

    def stop(self, c: Any) -> None:
        qos = getattr(getattr(c.task_consumer, "channel", None), "qos", None)
        if isinstance(qos, broker.QoS):
            try:
                qos.flush_acks()
            except Exception as exc:  # kept for the channel's close, or lost with Redis
                logger.warning("acks not written at stop", error=str(exc))


celery_app.steps["consumer"].add(DeferredAcks)


@signals.task_revoked.connect
def _record_revoked(request: Any = None, terminated: bool = False, **_: Any) -> None:
    if request is None or not request.id:
        return
    message = "cancelled while running" if terminated else "cancelled before it started"
    get_job_store(settings).finish(request.id, TaskStatus.REVOKED, message=message)
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
        get_job_store(settings).finish(
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
    from morag.services.retention import StorageJanitor
    from morag.services.webhooks import WebhookDispatcher, WebhookOutbox, WebhookSender

    registry = WorkerRegistry(get_redis(settings.redis_url), settings.key_prefix)
    recovery = RecoveryLoop(
        sender.app,
        get_job_store(settings),
        interval=settings.recovery_interval,
        grace_seconds=settings.recovery_grace_seconds,
        confirm_seconds=settings.lease_seconds / 3,
    )
    webhooks = None
    if settings.webhook_delivery_threads:
        _hold_log_locks_across_fork()  # delivery threads log while the pool forks children
        webhooks = WebhookDispatcher(
            WebhookOutbox(get_redis(settings.redis_url), settings.key_prefix),
            WebhookSender(get_job_store(settings), settings),
            threads=settings.webhook_delivery_threads,
        )
    assert settings.upload_dir is not None and settings.artifact_dir is not None
    janitor = StorageJanitor(
        get_job_store(settings),
        upload_dir=settings.upload_dir,
        artifact_dir=settings.artifact_dir,
        keep_inputs_until_expiry=settings.keep_inputs_until_expiry,
        index_prune_interval=settings.index_prune_interval,
    )
    _maintenance.append(_Maintenance(registry, recovery, webhooks, janitor))
    _maintenance[-1].start()
    # The pool forks a new child every worker_max_tasks_per_child jobs; a collection here
    # after each fork would copy every page it shares with the child. Everything loaded
    # by now lives as long as the worker, so the collector need not scan it again.
    gc.freeze()


def _hold_log_locks_across_fork() -> None:
    """structlog's per-file write locks are not reset in a forked child: a pool child
    forked while another thread of this process was writing a log line would block on its
    first log line forever. Holding them all across ``fork`` (as ``logging`` does for its
    own locks) means no thread is mid-write when the child is made."""
    from structlog import _output

    held: list[threading.Lock] = []

    def before() -> None:
        held[:] = list(getattr(_output, "WRITE_LOCKS", {}).values())
        for lock in held:
            lock.acquire()

    def after() -> None:
        for lock in held:
            lock.release()

    if not _fork_guard:
        _fork_guard.append(True)
        os.register_at_fork(before=before, after_in_parent=after, after_in_child=after)


@signals.worker_shutting_down.connect
def _stop_maintenance(**_: Any) -> None:
    for loop in _maintenance:
        loop.stop()


class _Maintenance(threading.Thread):
    """Every ``recovery_interval``: announce this worker, restore jobs of dead ones, delete
    the files of ended jobs (and prune the job index when its period has come); every
    ``WEBHOOK_DISPATCH_INTERVAL``: start the webhooks owed by jobs that ended."""

    def __init__(
        self, registry: WorkerRegistry, recovery: Any, webhooks: Any = None, janitor: Any = None
    ) -> None:
        super().__init__(name="morag-maintenance", daemon=True)
        self.registry = registry
        self.recovery = recovery
        self.webhooks = webhooks
        self.janitor = janitor
        self._stopped = threading.Event()

    def run(self) -> None:
        interval = settings.recovery_interval
        # webhooks go out on a shorter tick than recovery: one cheap script call when idle
        tick = min(interval, WEBHOOK_DISPATCH_INTERVAL) if self.webhooks else interval
        next_round = 0.0
        while not self._stopped.is_set():
            if time.monotonic() >= next_round:
                next_round = time.monotonic() + interval
                try:
                    self.registry.announce(
                        WorkerInfo(pid=os.getpid(), seen_at=utcnow().isoformat(), **_worker),
                        ttl_seconds=3 * interval,
                    )
                    self.recovery.run_once()
                except Exception as exc:  # Redis away: the next round tries again
                    logger.warning("worker maintenance failed", error=str(exc))
                try:
                    if self.janitor is not None:
                        self.janitor.run_once()
                except Exception as exc:  # what is due stays due for the next round
                    logger.warning("storage cleanup failed", error=str(exc))
            try:
                if self.webhooks is not None:
                    self.webhooks.dispatch()  # starts attempts on its threads; never waits
            except Exception as exc:  # entries stay in the outbox for the next round
                logger.warning("webhook dispatch failed", error=str(exc))
            self._stopped.wait(tick)

    def stop(self) -> None:
        self._stopped.set()
        if self.webhooks is not None:
            self.webhooks.close()
        try:
            self.registry.withdraw(_worker["hostname"])
        except Exception as exc:
            logger.warning("could not withdraw worker", error=str(exc))


#: Seconds between two looks at the webhook outbox (a job's webhook waits at most this).
WEBHOOK_DISPATCH_INTERVAL = 0.5

_worker: dict[str, Any] = {"hostname": "", "queues": [], "concurrency": 0, "started_at": ""}
_maintenance: list[_Maintenance] = []
_fork_guard: list[bool] = []
