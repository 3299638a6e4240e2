"""ProcessingTask: the bridge between a Celery delivery and the job record.

Every morag task runs through ``ProcessingTask.__call__``, which
1. claims the job (``JobStore.start``): a job that is final, cancelled, still leased by a
   live process, or out of attempts does not run;
2. keeps a lease on the job while it runs, so a dead process is noticed (recovery);
3. runs the task body, which reports progress through ``update_progress`` (throttled;
   stage changes always written) and is stopped by ``JobCancelledError`` when cancelled;
4. records the outcome: success with its result, failure with type and message, a
   retry with backoff for transient errors while attempts remain.

Redis restarting under a running job neither fails nor loses it: a progress write that
cannot reach Redis is skipped (the job goes on), and the claim and outcome writes wait for
Redis to come back, for up to ``REDIS_PATIENCE_SECONDS`` (tests/reliability).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import redis
import structlog
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from kombu.utils import json as kombu_json

from morag.core.celery_app import BaseTask
from morag.core.config import MODALITY_QUEUES, settings
from morag.core.errors import JobCancelledError, MoragError
from morag.core.sent_events import sent_event_batcher
from morag.processors.base import ProcessingResult
from morag.services.jobs import JobStore, TaskStatus, get_job_store, utcnow

logger = structlog.get_logger(__name__)

# One id per worker process incarnation: a restarted worker is a different holder.
_BOOT_ID = uuid.uuid4().hex[:8]

#: How long a claim or outcome write waits for an unreachable Redis (a restart) before the
#: task gives up; the message then stays unacked and recovery delivers it again.
REDIS_PATIENCE_SECONDS = 30.0
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
_T = TypeVar("_T")


def _patiently(write: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a job-record write, retrying while Redis is unreachable (bounded).

    Every write retried here is safe to repeat: the outcome scripts keep the first final
    state, and a repeated claim finds its own lease and defers.
    """
    deadline = time.monotonic() + REDIS_PATIENCE_SECONDS
    delay = 0.05
    while True:
        try:
            return write(*args, **kwargs)
        except _REDIS_DOWN as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("Redis unreachable; retrying a job-record write", error=str(exc))
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_BOOT_ID}"


class _LeaseKeeper:
    """Refreshes the lease of the job this process runs, from one daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: tuple[JobStore, str, str] | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, store: JobStore, task_id: str, worker: str) -> None:
        with self._lock:
            self._current = (store, task_id, worker)
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="morag-lease", daemon=True)
                self._thread.start()

    def release(self) -> None:
        with self._lock:
            self._current = None

    def _loop(self) -> None:
        while True:
            time.sleep(settings.lease_seconds / 6)
            with self._lock:
                current = self._current
            if current is not None:
                store, task_id, worker = current
                try:
                    answer = store.keep_lease(task_id, worker, settings.lease_seconds)
                except Exception as exc:  # Redis hiccup: the next round tries again
                    logger.warning("lease refresh failed", task_id=task_id, error=str(exc))
                    continue
                if answer == "retaken":
                    logger.warning(
                        "job lease had lapsed (Redis away?); taken again", task_id=task_id
                    )
                elif answer == "other":
                    logger.error("another process holds this job's lease", task_id=task_id)


_lease_keeper = _LeaseKeeper()


class ProcessingTask(BaseTask):
    """Base class of morag's tasks; see the module docstring."""

    abstract = True
    kind = "system"  # document | audio | video | web | system
    max_retries = None  # attempts are counted by the job record (settings.max_attempts)

    # -- submission ------------------------------------------------------------------------
    def apply_async(
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> Any:
        """Publish, writing the job record first so no status read can race the worker."""
        task_id = task_id or str(uuid.uuid4())
        self.create_job_record(task_id, args or (), kwargs or {})  # no-op for a retry
        options.setdefault("event_dispatcher", sent_event_batcher(self.app))
        return super().apply_async(args, kwargs, task_id=task_id, **options)

    def submit(
        self,
        *,
        kwargs: dict[str, Any],
        extra: dict[str, str] | None = None,
        task_id: str | None = None,
        dedupe_key: str | None = None,
        take_over: bool = False,
    ) -> str:
        """Create the record (with API fields such as batch id, webhook) and publish.

        Returns the id of the job doing the work: this one, or, with ``dedupe_key``, the
        active job that already holds that key (then nothing is published; see
        ``JobStore.create``).
        """
        task_id = task_id or str(uuid.uuid4())
        owner = self.create_job_record(
            task_id, (), kwargs, extra=extra, dedupe_key=dedupe_key, take_over=take_over
        )
        if owner is not None and owner != task_id:
            return owner  # identical work is active: that job does it
        super().apply_async(
            (), kwargs, task_id=task_id, event_dispatcher=sent_event_batcher(self.app)
        )
        return task_id

    def create_job_record(
        self,
        task_id: str,
        args: Any,
        kwargs: dict[str, Any],
        extra: dict[str, str] | None = None,
        dedupe_key: str | None = None,
        take_over: bool = False,
    ) -> str | None:
        inputs = {k: v for k, v in kwargs.items() if k in ("file_path", "url", "source_type")}
        extra = dict(extra or {})
        if "submission" not in extra:  # the API writes its own
            # What the message carries, so a job whose message the broker lost can be
            # queued again (services/recovery.py). kombu's JSON: the same types as the
            # message itself (datetimes, UUIDs...).
            extra["submission"] = kombu_json.dumps(
                {"task": self.name, "args": list(args), "kwargs": kwargs}
            )
        return get_job_store().create(
            task_id,
            kind=self.kind,
            queue=self.queue_name,
            task_name=self.name,
            input=inputs or {"args": list(args)},
            metadata=kwargs.get("metadata") or {},
            extra=extra,
            dedupe_key=dedupe_key,
            take_over=take_over,
        )

    @property
    def queue_name(self) -> str:
        return MODALITY_QUEUES.get(self.kind, "celery")

    # -- running ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task_id = self.request.id
        if self.request.called_directly or not task_id:
            return self.run(*args, **kwargs)  # plain function call: no job record
        store = get_job_store()
        worker = worker_identity()
        claim = _patiently(
            store.start,
            task_id,
            worker=worker,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
            kind=self.kind,
            queue=self.queue_name,
        )
        log = logger.bind(task_id=task_id, task_name=self.name)
        if claim.outcome == "busy":
            # Another live process holds the lease (a duplicate delivery): look again once
            # the lease could have expired, so the job survives if that holder dies.
            log.info("job is running elsewhere; deferring this delivery", holder=claim.detail)
            raise self.retry(countdown=settings.lease_seconds, max_retries=None)
        if claim.outcome != "ok":
            log.info("job not run", reason=claim.outcome, state=claim.detail)
            raise Ignore()
        log.info("job started", attempt=int(claim.detail), worker=worker)
        self._job = {"store": store, "worker": worker, "last_write": 0.0, "stage": ""}
        _lease_keeper.hold(store, task_id, worker)
        try:
            value = self.run(*args, **kwargs)
        except JobCancelledError:
            _patiently(
                store.finish,
                task_id,
                TaskStatus.REVOKED,
                message="cancelled while running",
                worker=worker,
            )
            log.info("job cancelled while running")
            raise Ignore() from None
        except SoftTimeLimitExceeded:
            limit = self.soft_time_limit
            self._fail(
                store,
                task_id,
                worker,
                "TimeLimitExceeded",
                f"the job took longer than its time limit of {limit} s",
            )
            raise
        except MoragError as exc:
            if exc.retryable and int(claim.detail) < settings.max_attempts:
                raise self._retry_later(store, task_id, worker, exc, int(claim.detail)) from exc
            self._fail(store, task_id, worker, type(exc).__name__, exc.message)
            raise
        except Exception as exc:
            self._fail(
                store,
                task_id,
                worker,
                type(exc).__name__,
                f"unexpected error while processing: {exc}",
            )
            raise
        finally:
            _lease_keeper.release()
        summary, result = _split_result(value)
        outcome = _patiently(
            store.finish,
            task_id,
            TaskStatus.SUCCESS,
            message="done",
            worker=worker,
            summary=summary,
            result=result,
        )
        log.info("job finished", state=outcome.detail)
        return summary

    def _fail(
        self, store: JobStore, task_id: str, worker: str, error_type: str, message: str
    ) -> None:
        _patiently(
            store.finish,
            task_id,
            TaskStatus.FAILURE,
            message=message,
            worker=worker,
            error_type=error_type,
            error_message=message,
        )

    def _retry_later(
        self, store: JobStore, task_id: str, worker: str, exc: MoragError, attempt: int
    ) -> Exception:
        """Record the retry and publish it with exponential backoff; returns Celery's Retry."""
        delay = min(
            settings.retry_backoff_seconds * 2 ** (attempt - 1), settings.retry_backoff_max_seconds
        )
        _patiently(
            store.mark_retry,
            task_id,
            message=f"retrying in {delay:.0f} s: {exc.message}",
            error_type=type(exc).__name__,
            error_message=exc.message,
            worker=worker,
            retry_at=utcnow() + timedelta(seconds=delay),
        )
        return self.retry(exc=exc, countdown=delay, max_retries=None, throw=False)

    # -- used by task bodies -----------------------------------------------------------------
    def update_progress(
        self, progress: float, message: str | None = None, stage: str | None = None, **metadata: Any
    ) -> None:
        """Report progress (0..1). Raises JobCancelledError when the job was cancelled.

        Stage changes are always written; percentage-only updates at most every
        ``settings.progress_min_interval`` seconds (each write costs a Redis round trip).
        """
        job = getattr(self, "_job", None)
        if job is None or self.request.called_directly:
            return
        stage = stage or job["stage"] or "processing"
        now = time.monotonic()
        if stage == job["stage"] and now - job["last_write"] < settings.progress_min_interval:
            return
        try:
            answer = job["store"].progress(
                self.request.id,
                progress,
                stage,
                message or stage,
                worker=job["worker"],
                lease_seconds=settings.lease_seconds,
            )
        except _REDIS_DOWN as exc:
            # Progress is a report, not the job: carry on and write the next one.
            if not job.get("redis_down"):
                logger.warning("progress not recorded: Redis unreachable", error=str(exc))
            job["redis_down"] = True
            return
        job["stage"], job["last_write"], job["redis_down"] = stage, now, False
        if answer != "ok":
            raise JobCancelledError(f"job stopped: {answer}")

    def progress_callback(self, fraction: float, stage: str, message: str = "") -> None:
        """The ``ProgressCallback`` handed to processors."""
        self.update_progress(fraction, message, stage=stage)

    def log_step(self, step: str, **kwargs: Any) -> None:
        """Log a processing step with the task's id."""
        logger.info(f"task step: {step}", task_id=self.request.id, task_name=self.name, **kwargs)


def _split_result(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary for the record, full result) from what a task body returned."""
    if isinstance(value, ProcessingResult):
        return value.summary(), value.to_dict()
    if isinstance(value, dict):
        return value, value
    return {"value": value}, {"value": value}


# Registers the worker's signal handlers wherever tasks are loaded.
from morag.tasks import lifecycle as _lifecycle  # noqa: E402,F401
