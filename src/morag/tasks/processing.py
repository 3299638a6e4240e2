"""ProcessingTask: the bridge between a Celery delivery and the job record.

Every morag task runs through ``ProcessingTask.__call__``, which
1. claims the job (``JobStore.start``): a job that is final, cancelled, still leased by a
   live process, or out of attempts does not run;
2. keeps a lease on the job while it runs, so a dead process is noticed (recovery);
3. runs the task body, which reports progress through ``update_progress`` (at most one
   write per ``progress_min_interval``; every stage reaches the history, a late one with
   the outcome) and is stopped by ``JobCancelledError`` when cancelled;
4. records the outcome: success with its result, failure with type and message, a
   retry with backoff for transient errors while attempts remain.

Redis restarting under a running job neither fails nor loses it: a progress write that
cannot reach Redis is skipped (the job goes on), and the claim and outcome writes wait for
Redis to come back, for up to ``REDIS_PATIENCE_SECONDS`` (tests/reliability).
"""

from __future__ import annotations

import json
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

from morag.core.broker import publish_options, publish_recorded
from morag.core.celery_app import BaseTask, celery_app
from morag.core.config import DEFAULT_QUEUE, MODALITY_QUEUES, PROCESSING_TASKS, settings
from morag.core.errors import JobCancelledError, MoragError
from morag.core.sent_events import sent_event_batcher
from morag.processors.base import ProcessingResult
from morag.services.jobs import JobStore, ProgressReport, TaskStatus, get_job_store, utcnow
from morag.tasks.indexing import INDEX_SHARE, index_result, wants_index

logger = structlog.get_logger(__name__)

# One id per worker process incarnation: a restarted worker is a different holder.
_BOOT_ID = uuid.uuid4().hex[:8]

#: How long a claim or outcome write waits for an unreachable Redis (a restart) before the
#: task gives up; the message then stays unacked and recovery delivers it again.
REDIS_PATIENCE_SECONDS = 30.0
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
#: The kinds of job whose chunks go to the index (the probe task has none).
INDEXED_KINDS = frozenset({"document", "audio", "video", "web"})
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
    """This process's name as a lease holder (computed once per process)."""
    pid = os.getpid()
    if _identity[0] != pid:
        _identity[:] = [pid, f"{socket.gethostname()}:{pid}:{_BOOT_ID}"]
    return str(_identity[1])


_identity: list[Any] = [0, ""]


class _ProgressWriter:
    """Writes the progress reports of the job this process runs.

    Each write is a Redis round trip, so reports are written at most every
    ``min_interval`` seconds, counted from the claim: a percentage-only report sooner
    than that is dropped; a new stage sooner than that is held, and written when the
    interval has passed (by the lease thread) or with the job's final write, whichever
    comes first, with the time it was made. No stage is lost from the history, and a job
    shorter than the interval writes its record twice (claim, outcome), not three times.
    """

    def __init__(self, store: JobStore, task_id: str, worker: str, min_interval: float) -> None:
        self.store, self.task_id, self.worker = store, task_id, worker
        self.min_interval = min_interval
        self._lock = threading.Lock()  # one write at a time, in the order reports came
        self._last_write = time.monotonic()  # the claim
        self._stage = ""
        self._held: ProgressReport | None = None
        self._stopped = ""  # the answer of a write that says the job must stop
        self._closed = False
        self._redis_down = False

    @property
    def due(self) -> float | None:
        """When the held report is to be written (monotonic), if one is held."""
        return self._last_write + self.min_interval if self._held is not None else None

    def report(
        self,
        progress: float,
        stage: str | None,
        message: str | None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Take a report. Raises JobCancelledError when a write answered that the job
        must stop."""
        with self._lock:
            if self._closed:
                return  # the job has its outcome: nothing more to report
            stage = stage or self._stage or "processing"
            new_stage, self._stage = stage != self._stage, stage
            report = ProgressReport(progress, stage, message or stage, utcnow(), metadata)
            if time.monotonic() - self._last_write < self.min_interval:
                if new_stage and self._held is not None and self._held.stage != stage:
                    self._write(self._held)  # two stages in one interval: keep both
                    self._held = report
                elif new_stage or self._held is not None:
                    self._held = report  # the latest report of the held stage
            else:
                if self._held is not None:
                    self._write(self._held)
                    self._held = None
                self._write(report)
            if self._stopped:
                raise JobCancelledError(f"job stopped: {self._stopped}")

    def write_due(self) -> None:
        """Write the held report if its time has come (the lease thread calls this)."""
        with self._lock:
            due = self.due
            if self._closed or due is None or time.monotonic() < due:
                return
            held, self._held = self._held, None
            assert held is not None
            self._write(held)

    def close(self) -> ProgressReport | None:
        """No more writes; the report still held, for the job's final write."""
        with self._lock:
            self._closed = True
            held, self._held = self._held, None
            return held

    def _write(self, report: ProgressReport) -> None:
        try:
            answer = self.store.progress(
                self.task_id,
                report.progress,
                report.stage,
                report.message,
                worker=self.worker,
                lease_seconds=settings.lease_seconds,
                at=report.at,
                metadata=report.metadata,
            )
        except _REDIS_DOWN as exc:
            # Progress is a report, not the job: carry on and write the next one.
            if not self._redis_down:
                logger.warning("progress not recorded: Redis unreachable", error=str(exc))
            self._redis_down = True
            return
        self._last_write, self._redis_down = time.monotonic(), False
        if answer != "ok":
            self._stopped = answer


class _LeaseKeeper:
    """One daemon thread per process: refreshes the lease of the job this process runs,
    and writes its held progress report when that is due."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: _ProgressWriter | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, job: _ProgressWriter) -> None:
        with self._lock:
            self._current = job
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="morag-lease", daemon=True)
                self._thread.start()

    def release(self) -> None:
        with self._lock:
            self._current = None

    def _loop(self) -> None:
        # A look every half progress interval: a held report is at most 1.5 intervals late,
        # and a job's start or report costs it no wake-up call (8 looks a second, idle).
        job: _ProgressWriter | None = None
        next_refresh = 0.0
        while True:
            time.sleep(max(settings.progress_min_interval / 2, 0.05))
            with self._lock:
                current = self._current
            if current is None:
                continue
            if current is not job:  # a new job: its claim set the lease just now
                job, next_refresh = current, time.monotonic() + settings.lease_seconds / 6
            current.write_due()
            if time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + settings.lease_seconds / 6
                self._refresh(current)

    @staticmethod
    def _refresh(job: _ProgressWriter) -> None:
        try:
            answer = job.store.keep_lease(job.task_id, job.worker, settings.lease_seconds)
        except Exception as exc:  # Redis hiccup: the next round tries again
            logger.warning("lease refresh failed", task_id=job.task_id, error=str(exc))
            return
        if answer == "retaken":
            logger.warning("job lease had lapsed (Redis away?); taken again", task_id=job.task_id)
        elif answer == "other":
            logger.error("another process holds this job's lease", task_id=job.task_id)


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
        """Publish, writing the job record first so no status read can race the worker:
        with morag's transport, in the same Redis call as the message (core/broker.py)."""
        task_id = task_id or str(uuid.uuid4())
        options = {
            "event_dispatcher": sent_event_batcher(self.app),
            **publish_options(args, kwargs),
            **options,
        }

        def write_record(push: tuple[str, str] | None) -> str | None:  # no-op for a retry
            return self.create_job_record(task_id, args or (), kwargs or {}, push=push)

        publish = super().apply_async
        _, result = publish_recorded(
            self.app,
            task_id,
            write_record,
            lambda: publish(args, kwargs, task_id=task_id, **options),
        )
        return result

    def create_job_record(
        self, task_id: str, args: Any, kwargs: dict[str, Any], push: tuple[str, str] | None = None
    ) -> str | None:
        return get_job_store(settings).create_submitted(
            task_id,
            task_name=self.name,
            kind=self.kind,
            queue=self.queue_name,
            kwargs=kwargs,
            args=args,
            push=push,
        )

    @property
    def queue_name(self) -> str:
        return MODALITY_QUEUES.get(self.kind, DEFAULT_QUEUE)

    # -- running ---------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task_id = self.request.id
        if self.request.called_directly or not task_id:
            return self.run(*args, **kwargs)  # plain function call: no job record
        store = get_job_store(settings)
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
        # One info line per job (its end, below): a line costs the pool process ~25 µs, a
        # tenth of a no-op job; Celery's main process logs the delivery already.
        log.debug("job started", attempt=int(claim.detail), worker=worker)
        job = self._job = _ProgressWriter(store, task_id, worker, settings.progress_min_interval)
        _lease_keeper.hold(job)
        indexing = self.kind in INDEXED_KINDS and wants_index(kwargs.get("options"))
        # The processor reports 0..1 of its own work; embedding and indexing follow it.
        self._progress_scale = 1.0 - INDEX_SHARE if indexing else 1.0
        try:
            value = self.run(*args, **kwargs)
            if indexing and isinstance(value, ProcessingResult):
                self._progress_scale = 1.0
                owner = _patiently(store.owner_of, task_id)
                index_result(self, value, kwargs, owner, task_id)
        except JobCancelledError:
            _patiently(
                store.finish,
                task_id,
                TaskStatus.REVOKED,
                message="cancelled while running",
                worker=worker,
                last_report=job.close(),
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
                job.close()  # a report held now is dropped: the next attempt starts over
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
            last_report=job.close(),
        )
        log.info("job finished", state=outcome.detail, attempt=int(claim.detail), worker=worker)
        # Celery keeps no result (the record has it) but renders the return value with its
        # pure-Python saferepr for its success line and the task-succeeded event: a summary
        # as JSON text says the same to monitors at a seventh of the cost (7 µs against 54
        # for the probe's, 12 against 100 for a document's).
        return json.dumps(summary)

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
            last_report=self._job.close(),  # the stage it failed in, into the history
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
        """Report progress (0..1), with ``metadata`` kept in the record and the history.
        Raises JobCancelledError when the job was cancelled.

        Every stage reaches the record, percentage-only updates at most every
        ``settings.progress_min_interval`` seconds (``_ProgressWriter``).
        """
        job = getattr(self, "_job", None)
        if job is None or self.request.called_directly:
            return
        progress *= getattr(self, "_progress_scale", 1.0)
        job.report(progress, stage, message, metadata or None)

    def progress_callback(self, fraction: float, stage: str, message: str = "") -> None:
        """The ``ProgressCallback`` handed to processors."""
        self.update_progress(fraction, message, stage=stage)

    def log_step(self, step: str, **kwargs: Any) -> None:
        """Log a processing step with the task's id."""
        logger.info(f"task step: {step}", task_id=self.request.id, task_name=self.name, **kwargs)


def processing_task(kind: str) -> Callable[[Callable[..., Any]], ProcessingTask]:
    """Declare a task body as the ``ProcessingTask`` of ``kind`` (a modality, or ``system``
    for the default queue): its name from ``PROCESSING_TASKS``, its queue's time limits."""
    queue = MODALITY_QUEUES.get(kind, DEFAULT_QUEUE)
    options: dict[str, Any] = {}
    if kind in PROCESSING_TASKS:
        options["name"] = PROCESSING_TASKS[kind]
    return celery_app.task(  # type: ignore[no-any-return]
        bind=True,
        base=ProcessingTask,
        kind=kind,
        soft_time_limit=settings.soft_time_limit(queue),
        time_limit=settings.hard_time_limit(queue),
        **options,
    )


def _split_result(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary for the record, full result) from what a task body returned."""
    if isinstance(value, ProcessingResult):
        return value.summary(), value.to_dict()
    if isinstance(value, dict):
        return value, value
    return {"value": value}, {"value": value}


# Registers the worker's signal handlers wherever tasks are loaded.
from morag.tasks import lifecycle as _lifecycle  # noqa: E402,F401
