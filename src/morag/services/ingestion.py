"""The ingestion service: what the API does, without HTTP.

Submissions are checked before anything is queued (content type from the bytes, URLs and
webhook targets through the SSRF guard, metadata and option limits), then published
through the modality's task, which writes the job record first. Two keys keep repeats
cheap and safe:

* ``<prefix>:idem:<scope>:<hash of Idempotency-Key>`` -> the original job (or batch) and a
  fingerprint of the request; a repeat with the same key answers the original, a different
  request under the same key is refused (422).
* ``<prefix>:dedupe:<fingerprint of content + source type + options + webhook>`` -> the job
  doing that work; an identical submission while that job is queued or running gets the
  same job instead of a duplicate.

Batches are ``<prefix>:batch:<id>`` hashes listing their jobs. Each job record carries
``submission`` (task name and kwargs) so a failed or cancelled job can be re-run as a new
job (``retry_of``), and ``webhook_url`` for the webhook sender.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import redis

from morag.core.errors import (
    ConflictError,
    InvalidInputError,
    LimitExceededError,
    MoragError,
    NotFoundError,
    TransientError,
    UnsupportedFormatError,
)
from morag.core.redis_conn import get_redis
from morag.core.url_guard import UrlPolicy, validate_url
from morag.processors.base import ChunkingOptions
from morag.services.jobs import (
    FINAL_STATES,
    JobStore,
    TaskInfo,
    TaskStatus,
    get_job_store,
    utcnow,
)
from morag.services.retention import input_for_retry, input_gone
from morag.services.uploads import StoredFile, stored_name

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from morag.core.config import Settings
    from morag.services.task_manager import TaskManager
    from morag.tasks.processing import ProcessingTask

#: Jobs read per round trip while filtering the job list.
LIST_SCAN_PAGE = 200
#: Event-stream followers per API process. Each holds its own Redis pub/sub connection
#: (simple and independent of every other follower); Redis allows 10,000 clients by default.
MAX_FOLLOWERS = 4096
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Threads that run ``asubmit``'s submissions for the event loop. Few: they take turns on
#: the GIL anyway, and each one more adds GIL hand-offs. Two overlap the two Redis round
#: trips of a submission (record, message); with 16 concurrent clients 2 threads answered
#: 720 submissions/s, 1 thread 670/s and 4 threads 580/s (kernel CPU per request +40%).
SUBMIT_THREADS = 2


@dataclass
class JobSpec:
    """A checked submission, ready to publish."""

    kind: str  # document | audio | video | web
    kwargs: dict[str, Any]
    webhook_url: str | None
    content_key: str  # what makes two submissions the same work (dedupe)
    request_key: str  # what makes two requests the same request (idempotency)
    upload: StoredFile | None = None  # deleted when the request turns out a repeat
    retry_input: str = ""  # a retry's own name for the failed job's uploaded file

    @property
    def owned_file(self) -> str:
        """The stored input this job owns (deleted when it ends), if any."""
        return str(self.upload.path) if self.upload is not None else self.retry_input


@dataclass
class Submission:
    task_id: str
    status: TaskStatus
    message: str
    replayed: bool = False  # answered from the Idempotency-Key record
    duplicate: bool = False  # identical work was already queued or running


@dataclass
class BatchSubmission:
    batch_id: str
    task_ids: list[str]
    replayed: bool = False
    submissions: list[Submission] = field(default_factory=list)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def normalise_url(url: str) -> str:
    """The form two URLs for the same resource share: lower-case scheme and host, no
    default port, no fragment, ``/`` for an empty path."""
    parsed = httpx.URL(url)
    if parsed.port == _DEFAULT_PORTS.get(parsed.scheme):
        parsed = parsed.copy_with(port=None)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{parsed.raw_path.decode('ascii')}"


# Returns the job already doing this work, or claims the key for ARGV[1] and returns it.
# KEYS[1]: dedupe key | ARGV: new id, job key prefix, claim seconds


class IngestionService:
    """Submission, idempotency, dedupe, batches, retries and reads for the API."""

    def __init__(self, cfg: Settings) -> None:
        self.settings = cfg
        self.policy = UrlPolicy.from_settings(cfg)
        self._aio: aioredis.Redis | None = None
        self._aio_reads: aioredis.Redis | None = None
        self._submit_threads: ThreadPoolExecutor | None = None

    # -- plumbing -------------------------------------------------------------------------
    @property
    def redis(self) -> redis.Redis:
        return get_redis(self.settings.redis_url)

    @property
    def store(self) -> JobStore:
        return get_job_store(self.settings)

    @property
    def task_manager(self) -> TaskManager:
        from morag.services.task_manager import TaskManager, task_manager

        if self.settings is task_manager.settings:
            return task_manager
        return TaskManager(cfg=self.settings)

    @property
    def aio(self) -> aioredis.Redis:
        """An asyncio client for event streams (created in the serving event loop)."""
        if self._aio is None:
            import redis.asyncio as aioredis

            self._aio = aioredis.Redis.from_url(
                self.settings.redis_url,
                socket_connect_timeout=2,
                max_connections=MAX_FOLLOWERS + 32,  # followers plus existence checks
            )
        return self._aio

    @property
    def aio_reads(self) -> aioredis.Redis:
        """An asyncio client for reads that answer a request (created in the serving loop).

        Apart from ``aio``, so event streams, which hold a connection each (up to
        ``MAX_FOLLOWERS``), never use up the connections reads need. Timeouts as the sync
        client's.
        """
        if self._aio_reads is None:
            import redis.asyncio as aioredis

            self._aio_reads = aioredis.Redis.from_url(
                self.settings.redis_url, socket_connect_timeout=2, socket_timeout=10
            )
        return self._aio_reads

    async def aclose(self) -> None:
        if self._aio is not None:
            await self._aio.aclose()
            self._aio = None
        if self._aio_reads is not None:
            await self._aio_reads.aclose()
            self._aio_reads = None
        if self._submit_threads is not None:
            self._submit_threads.shutdown(wait=False)
            self._submit_threads = None

    def _key(self, *parts: str) -> str:
        return ":".join((self.settings.key_prefix, *parts))

    @property
    def upload_dir(self) -> Path:
        assert self.settings.upload_dir is not None
        return self.settings.upload_dir

    # -- checking submissions -------------------------------------------------------------
    def check_metadata(self, metadata: Any, field_name: str = "metadata") -> dict[str, Any]:
        """A JSON object within ``max_metadata_bytes``."""
        if metadata is None:
            return {}
        if not isinstance(metadata, dict):
            raise InvalidInputError(
                f"{field_name} must be a JSON object", details={"field": field_name}
            )
        size = len(json.dumps(metadata, ensure_ascii=False).encode())
        if size > self.settings.max_metadata_bytes:
            raise LimitExceededError(
                f"{field_name} is {size} bytes as JSON; the limit is "
                f"{self.settings.max_metadata_bytes} bytes",
                details={
                    "field": field_name,
                    "size_bytes": size,
                    "max_bytes": self.settings.max_metadata_bytes,
                },
            )
        return metadata

    def parse_metadata(self, text: str | None, field_name: str = "metadata") -> dict[str, Any]:
        """Metadata sent as a JSON string (multipart forms)."""
        if text is None or not text.strip():
            return {}
        if len(text.encode()) > self.settings.max_metadata_bytes:
            raise LimitExceededError(
                f"{field_name} is larger than {self.settings.max_metadata_bytes} bytes",
                details={"field": field_name, "max_bytes": self.settings.max_metadata_bytes},
            )
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidInputError(
                f"{field_name} is not valid JSON: {exc}", details={"field": field_name}
            ) from None
        return self.check_metadata(value, field_name)

    def check_options(
        self, options: dict[str, Any] | None, field_name: str = "options"
    ) -> dict[str, int]:
        """Chunking options with the server's defaults filled in (what the job will use)."""
        given = {k: v for k, v in (options or {}).items() if v is not None}
        effective = {
            "chunk_size_tokens": int(
                given.get("chunk_size_tokens", self.settings.chunk_size_tokens)
            ),
            "chunk_overlap_tokens": int(
                given.get("chunk_overlap_tokens", self.settings.chunk_overlap_tokens)
            ),
        }
        try:
            ChunkingOptions(
                chunk_tokens=effective["chunk_size_tokens"],
                overlap_tokens=effective["chunk_overlap_tokens"],
            )
        except ValueError as exc:
            raise InvalidInputError(
                f"invalid chunking options: chunk_overlap_tokens "
                f"({effective['chunk_overlap_tokens']}) must be smaller than "
                f"chunk_size_tokens ({effective['chunk_size_tokens']})",
                details={"field": f"{field_name}.chunk_overlap_tokens", "reason": str(exc)},
            ) from None
        return effective

    def check_webhook(self, url: str | None, field_name: str = "webhook_url") -> str | None:
        """An http(s) target that passes the SSRF guard's checks (delivery re-checks it)."""
        if url is None or not url.strip():
            return None
        return self._check_url(url, field_name)

    def _check_url(self, url: str, field_name: str) -> str:
        try:
            return validate_url(url, self.policy)
        except MoragError as exc:
            exc.message = f"{field_name}: {exc.message}"
            exc.details = {"field": field_name, **exc.details}
            raise

    def prepare_url(
        self,
        url: str,
        *,
        source_type: str = "web",
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        options: dict[str, Any] | None = None,
        field_prefix: str = "",
    ) -> JobSpec:
        """Check a URL submission: a web page (``web``), or media the worker downloads and
        processes like an upload (``audio``, ``video``)."""
        checked = self._check_url(url, f"{field_prefix}url")
        if source_type not in ("web", "audio", "video"):
            raise InvalidInputError(
                f"source_type must be web, audio or video, not {source_type!r}",
                details={"field": f"{field_prefix}source_type", "source_type": source_type},
            )
        meta = self.check_metadata(metadata, f"{field_prefix}metadata")
        hook = self.check_webhook(webhook_url, f"{field_prefix}webhook_url")
        opts = self.check_options(options, f"{field_prefix}options")
        return JobSpec(
            kind=source_type,
            kwargs={"url": checked, "metadata": meta, "options": opts},
            webhook_url=hook,
            content_key=_digest(
                {
                    "url": normalise_url(checked),
                    "source_type": source_type,
                    "options": opts,
                    "webhook_url": hook,
                }
            ),
            request_key=_digest(
                {
                    "url": checked,
                    "source_type": source_type,
                    "metadata": meta,
                    "webhook_url": hook,
                    "options": opts,
                }
            ),
        )

    def prepare_file(
        self,
        stored: StoredFile,
        *,
        source_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> JobSpec:
        """Check an uploaded file: not empty, a type morag processes (from its bytes)."""
        if stored.size == 0:
            raise InvalidInputError(
                f"the uploaded file {stored.client_name or stored.field!r} is empty",
                details={"field": stored.field},
            )
        kind = self.detect_kind(stored, source_type)
        meta = dict(self.check_metadata(metadata))
        if stored.client_name:
            meta["filename"] = stored.client_name  # the worker tells text from Markdown by it
        hook = self.check_webhook(webhook_url)
        opts = self.check_options(options)
        kwargs: dict[str, Any] = {"file_path": str(stored.path), "metadata": meta, "options": opts}
        if kind == "document":
            kwargs["source_type"] = "document"
        return JobSpec(
            kind=kind,
            kwargs=kwargs,
            webhook_url=hook,
            content_key=_digest(
                {"sha256": stored.sha256, "source_type": kind, "options": opts, "webhook_url": hook}
            ),
            request_key=_digest(
                {
                    "sha256": stored.sha256,
                    "name": stored.client_name,
                    "source_type": source_type,
                    "metadata": meta,
                    "webhook_url": hook,
                    "options": opts,
                }
            ),
            upload=stored,
        )

    @staticmethod
    def detect_kind(stored: StoredFile, declared: str | None) -> str:
        """document, audio or video, from the file's bytes; 415 when morag cannot process it
        or the bytes contradict the declared type."""
        from morag.processors.detect import detect_type, media_kind

        if declared in ("audio", "video"):
            if media_kind(stored.path) is None:
                raise UnsupportedFormatError(
                    f"source_type is {declared} but the file is not an audio or video file",
                    details={"field": "source_type", "declared": declared},
                )
            return declared
        try:
            detect_type(stored.path, stored.client_name or None)
        except UnsupportedFormatError as exc:
            # detect_type recognises media files and says so; undeclared, they are media.
            found = exc.details.get("media_kind")
            if declared is None and found in ("audio", "video"):
                return str(found)
            raise
        return "document"

    # -- submitting -----------------------------------------------------------------------
    def _task(self, kind: str) -> ProcessingTask:
        from morag.tasks import base

        return {
            "document": base.process_document_task,
            "audio": base.process_audio_task,
            "video": base.process_video_task,
            "web": base.process_web_task,
        }[kind]

    def _idem_key(self, principal: str, key: str) -> str:
        return self._key("idem", principal, hashlib.sha256(key.encode()).hexdigest())

    def _replay(self, principal: str, key: str | None, fingerprint: str) -> dict[str, Any] | None:
        """The stored answer of an earlier request with this Idempotency-Key, if any."""
        if not key:
            return None
        raw = self.redis.get(self._idem_key(principal, key))
        if raw is None:
            return None
        record = json.loads(raw)
        if record["fingerprint"] != fingerprint:
            raise InvalidInputError(
                "this Idempotency-Key was already used for a different request; "
                "use a new key for a new request",
                details={"field": "Idempotency-Key"},
            )
        return record

    def _claim_idem(self, principal: str, key: str | None, record: dict[str, Any]) -> bool:
        """Store the key's answer unless another request stored one first."""
        if not key:
            return True
        return bool(
            self.redis.set(
                self._idem_key(principal, key),
                json.dumps(record),
                nx=True,
                ex=self.settings.result_retention_seconds,
            )
        )

    def _release(self, key: str, value_contains: str) -> None:
        raw = self.redis.get(key)
        if raw is not None and value_contains in _text(raw):
            self.redis.delete(key)

    def _publish(
        self,
        spec: JobSpec,
        task_id: str,
        *,
        batch_id: str | None = None,
        retry_of: str | None = None,
    ) -> str:
        """Create the record and queue the job, unless identical work is active: the id of
        the job that does the work (``task_id`` when this one was queued). A retry takes
        the content key over: identical submissions join it from now on."""
        task = self._task(spec.kind)
        extra = {
            "submission": json.dumps({"task": task.name, "kwargs": spec.kwargs}),
            "content_key": spec.content_key,
        }
        if spec.owned_file:
            # the job's own input: deleted when it ends (services/retention.py)
            extra["owned_files"] = json.dumps([spec.owned_file])
        if spec.webhook_url:
            extra["webhook_url"] = spec.webhook_url
        if batch_id:
            extra["batch_id"] = batch_id
        if retry_of:
            extra["retry_of"] = retry_of
        return task.submit(
            kwargs=spec.kwargs,
            extra=extra,
            task_id=task_id,
            dedupe_key=self._key("dedupe", spec.content_key),
            take_over=retry_of is not None,
        )

    def _existing(self, task_id: str, message: str, **flags: bool) -> Submission:
        info = self.store.get(task_id)
        status = info.status if info else TaskStatus.PENDING
        return Submission(task_id, status, message, **flags)

    def submit(
        self, spec: JobSpec, *, principal: str = "anonymous", idempotency_key: str | None = None
    ) -> Submission:
        """Queue one job, or answer the job an identical earlier request or work created."""
        fingerprint = _digest({"op": "job", "request": spec.request_key}) if idempotency_key else ""
        replay = self._replay(principal, idempotency_key, fingerprint)
        if replay is not None:
            self._discard(spec)
            return self._existing(
                replay["task_id"],
                "repeated request (same Idempotency-Key): this is the original job",
                replayed=True,
            )
        task_id = str(uuid.uuid4())
        if not self._claim_idem(
            principal, idempotency_key, {"task_id": task_id, "fingerprint": fingerprint}
        ):
            return self.submit(spec, principal=principal, idempotency_key=idempotency_key)
        try:
            owner = self._publish(spec, task_id)
            if owner != task_id:
                self._discard(spec)
                if idempotency_key:
                    self.redis.set(
                        self._idem_key(principal, idempotency_key),
                        json.dumps({"task_id": owner, "fingerprint": fingerprint}),
                        xx=True,
                        ex=self.settings.result_retention_seconds,
                    )
                return self._existing(
                    owner,
                    "identical content is already queued or running: this is that job",
                    duplicate=True,
                )
        except BaseException:
            if idempotency_key:
                self._release(self._idem_key(principal, idempotency_key), task_id)
            raise
        return Submission(task_id, TaskStatus.PENDING, "queued for processing")

    async def asubmit(
        self, spec: JobSpec, *, principal: str = "anonymous", idempotency_key: str | None = None
    ) -> Submission:
        """``submit`` from the event loop, on the service's submission threads (Celery
        publishes with blocking calls). A cancelled caller does not stop the submission."""
        if self._submit_threads is None:
            self._submit_threads = ThreadPoolExecutor(SUBMIT_THREADS, "morag-submit")
        call = functools.partial(
            self.submit, spec, principal=principal, idempotency_key=idempotency_key
        )
        return await asyncio.get_running_loop().run_in_executor(self._submit_threads, call)

    def submit_batch(
        self,
        specs: list[JobSpec],
        *,
        principal: str = "anonymous",
        idempotency_key: str | None = None,
    ) -> BatchSubmission:
        """Queue checked items as one batch (each identical to active work joins that job)."""
        if not specs:
            raise InvalidInputError("a batch needs at least one item", details={"field": "items"})
        self.check_batch_size(len(specs))
        fingerprint = _digest({"op": "batch", "items": [s.request_key for s in specs]})
        replay = self._replay(principal, idempotency_key, fingerprint)
        if replay is not None:
            for spec in specs:
                self._discard(spec)
            return BatchSubmission(replay["batch_id"], replay["task_ids"], replayed=True)
        batch_id = str(uuid.uuid4())
        task_ids = [str(uuid.uuid4()) for _ in specs]
        record = {"batch_id": batch_id, "task_ids": task_ids, "fingerprint": fingerprint}
        if not self._claim_idem(principal, idempotency_key, record):
            return self.submit_batch(specs, principal=principal, idempotency_key=idempotency_key)
        submissions: list[Submission] = []
        try:
            for index, (spec, task_id) in enumerate(zip(specs, task_ids, strict=True)):
                owner = self._publish(spec, task_id, batch_id=batch_id)
                if owner == task_id:
                    submissions.append(Submission(task_id, TaskStatus.PENDING, "queued"))
                    continue
                self._discard(spec)
                task_ids[index] = owner
                submissions.append(
                    self._existing(owner, "already queued or running", duplicate=True)
                )
        except BaseException:
            # Jobs already recorded stay: the record queues a job whose publish failed
            # again (services/recovery.py); only the idempotency key goes.
            if idempotency_key:
                self._release(self._idem_key(principal, idempotency_key), batch_id)
            for spec in specs[len(submissions) :]:
                self._discard(spec)  # never published: nobody will read these files
            raise
        self.redis.set(
            self._key("batch", batch_id),
            json.dumps({"created_at": utcnow().isoformat(), "task_ids": task_ids}),
            ex=self.settings.result_retention_seconds,
        )
        if idempotency_key:
            record["task_ids"] = task_ids  # duplicates replaced by the jobs they joined
            self.redis.set(
                self._idem_key(principal, idempotency_key),
                json.dumps(record),
                xx=True,
                ex=self.settings.result_retention_seconds,
            )
        return BatchSubmission(batch_id, task_ids, submissions=submissions)

    def check_batch_size(self, count: int) -> None:
        if count > self.settings.batch_max_items:
            raise LimitExceededError(
                f"a batch holds at most {self.settings.batch_max_items} items; got {count}",
                details={
                    "field": "items",
                    "max_items": self.settings.batch_max_items,
                    "items": count,
                },
            )

    @staticmethod
    def _discard(spec: JobSpec) -> None:
        if spec.upload is not None:
            spec.upload.path.unlink(missing_ok=True)

    def retry(
        self, task_id: str, *, principal: str = "anonymous", idempotency_key: str | None = None
    ) -> Submission:
        """Run a failed or cancelled job again as a new job with the same input."""
        fingerprint = _digest({"op": "retry", "task_id": task_id})
        replay = self._replay(principal, idempotency_key, fingerprint)
        if replay is not None:
            return self._existing(
                replay["task_id"],
                "repeated request (same Idempotency-Key): this is the retry it created",
                replayed=True,
            )
        info = self.store.get(task_id)
        if info is None:
            raise NotFoundError(f"no job with id {task_id}")
        if info.status not in (TaskStatus.FAILURE, TaskStatus.REVOKED):
            raise ConflictError(
                f"job {task_id} is {info.status.value}; only failed or cancelled jobs can be "
                "retried",
                details={"status": info.status.value},
            )
        job_key = self.store.job_key(task_id)
        raw_submission, content_key = self.redis.hmget(job_key, "submission", "content_key")
        if not raw_submission:
            raise ConflictError(
                f"job {task_id} was not submitted through the API, so its "
                "input is not known; submit it again",
                details={"status": info.status.value},
            )
        submission = json.loads(raw_submission)
        file_path = submission["kwargs"].get("file_path")
        owned = json.loads(_text(self.redis.hget(job_key, "owned_files")) or "[]")
        if file_path and file_path in owned and not Path(file_path).is_file():
            raise input_gone(task_id)
        if file_path and not Path(file_path).is_file():
            raise ConflictError(
                f"the input file of job {task_id} is no longer stored; submit it again",
                details={"status": info.status.value},
            )
        kind = next(
            (
                k
                for k in ("document", "audio", "video", "web")
                if self._task(k).name == submission.get("task")
            ),
            None,
        )
        if kind is None:
            raise ConflictError(
                f"job {task_id} ran a task the API does not submit",
                details={"status": info.status.value},
            )
        new_id = str(uuid.uuid4())
        # One retry per job, even for two concurrent requests: the first one wins.
        if not self.redis.hsetnx(job_key, "retried_by", new_id):
            earlier = _text(self.redis.hget(job_key, "retried_by"))
            raise ConflictError(
                f"job {task_id} was already retried as {earlier}; retry that job if it failed too",
                details={"retried_by": earlier},
            )
        if not self._claim_idem(
            principal, idempotency_key, {"task_id": new_id, "fingerprint": fingerprint}
        ):
            self.redis.hdel(job_key, "retried_by")
            return self.retry(task_id, principal=principal, idempotency_key=idempotency_key)
        spec = JobSpec(
            kind=kind,
            kwargs=dict(submission["kwargs"]),
            webhook_url=info.webhook_url,
            content_key=_text(content_key) or new_id,
            request_key="",
        )
        try:
            if file_path and file_path in owned:
                # Its own name for the file: the failed job's is deleted with that job.
                linked = input_for_retry(Path(file_path), stored_name(file_path), task_id=task_id)
                spec.kwargs["file_path"] = spec.retry_input = str(linked)
            self._publish(spec, new_id, retry_of=task_id)
        except BaseException:
            if spec.retry_input:
                Path(spec.retry_input).unlink(missing_ok=True)
            self.redis.hdel(job_key, "retried_by")
            if idempotency_key:
                self._release(self._idem_key(principal, idempotency_key), new_id)
            raise
        return Submission(
            new_id, TaskStatus.PENDING, f"queued again as a new job (retry of {task_id})"
        )

    # -- reading --------------------------------------------------------------------------
    def status(self, task_id: str) -> TaskInfo:
        return self.task_manager.get_task_status(task_id)

    async def astatus(self, task_id: str) -> TaskInfo:
        """``status`` in the event loop: one read of the job record, no thread hop."""
        info = await self.store.aget(self.aio_reads, task_id)
        if info is not None:
            return info
        # No record (unknown id, or a task another client sent): the TaskManager asks
        # Celery's result backend through its blocking client, so off the event loop.
        return await asyncio.to_thread(self.status, task_id)

    def history(self, task_id: str) -> list[dict[str, Any]]:
        if not self.redis.exists(self.store.job_key(task_id)):
            raise NotFoundError(f"no job with id {task_id}")
        return self.store.history(task_id)

    def artifact_path(self, task_id: str, name: str) -> tuple[Path, str]:
        """The file of one of a finished job's artefacts (a keyframe) and its media type."""
        result = self.store.result(task_id)
        if result is None:
            raise NotFoundError(f"job {task_id} has no stored result")
        for artifact in result.get("artifacts") or []:
            if artifact.get("name") == name:
                assert self.settings.artifact_dir is not None
                root = self.settings.artifact_dir.resolve()
                path = (root / artifact["path"]).resolve()
                if path.is_relative_to(root) and path.is_file():
                    return path, artifact.get("media_type") or "application/octet-stream"
                raise NotFoundError(f"artefact {name} of job {task_id} is no longer stored")
        raise NotFoundError(f"job {task_id} has no artefact named {name}")

    def result(
        self, task_id: str, *, offset: int, limit: int, include_markdown: bool = True
    ) -> dict[str, Any]:
        """The job's Markdown, metadata and one page of its chunks; 409 unless it succeeded."""
        info = self.store.get(task_id)
        if info is None:
            raise NotFoundError(f"no job with id {task_id}")
        if info.status is not TaskStatus.SUCCESS:
            raise ConflictError(
                f"job {task_id} has no result: it is {info.status.value}"
                + ("" if info.status.is_final else "; wait for it to finish"),
                details={"status": info.status.value},
            )
        result = self.store.result(task_id)
        if result is None:
            raise NotFoundError(f"the result of job {task_id} is no longer stored")
        chunks = result.get("chunks") or []
        page = chunks[offset : offset + limit]
        return {
            "task_id": task_id,
            "kind": result.get("kind", info.kind),
            "markdown": result.get("markdown", "") if include_markdown else None,
            "metadata": result.get("metadata") or {},
            "artifacts": result.get("artifacts") or [],
            "chunks": page,
            "total_chunks": len(chunks),
            "offset": offset,
            "limit": limit,
            "next_offset": offset + limit if offset + limit < len(chunks) else None,
        }

    def list_jobs(
        self,
        *,
        states: Iterable[TaskStatus] = (),
        kind: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[TaskInfo], int | None]:
        """Jobs newest first, filtered; returns a page and the offset of the next one.

        Time bounds use the index of creation times; state and kind are checked on the
        records, reading them a page at a time.
        """
        wanted = set(states)
        start = _epoch(created_after)
        end = _epoch(created_before)
        if start and end and start > end:
            return [], None
        filtered = bool(wanted or kind)
        found: list[TaskInfo] = []
        skipped = 0
        scan_offset = 0 if filtered else offset
        while True:
            page_size = LIST_SCAN_PAGE if filtered else limit + 1
            ids = self.store.list_ids(start=start, end=end, offset=scan_offset, count=page_size)
            for info in self.store.get_many(ids):
                if info is None:
                    continue  # its record expired; the index entry goes at the next prune
                if (wanted and info.status not in wanted) or (kind and info.kind != kind):
                    continue
                if filtered and skipped < offset:
                    skipped += 1
                    continue
                found.append(info)
                if len(found) > limit:
                    return found[:limit], offset + limit
            if len(ids) < page_size or not filtered:
                return found[:limit], None
            scan_offset += page_size

    def batch_status(self, batch_id: str) -> dict[str, Any]:
        """Counts of the batch's jobs by state and the batch's overall progress."""
        raw = self.redis.get(self._key("batch", batch_id))
        if raw is None:
            raise NotFoundError(f"no batch with id {batch_id}")
        batch = json.loads(raw)
        task_ids: list[str] = batch["task_ids"]
        counts: dict[str, int] = {state.value: 0 for state in TaskStatus}
        counts["expired"] = 0
        progress = 0.0
        finished = 0
        for info in self.store.get_many(task_ids):
            if info is None:
                counts["expired"] += 1
                finished += 1
                progress += 1.0
                continue
            counts[info.status.value] += 1
            if info.status in FINAL_STATES:
                finished += 1
                progress += 1.0  # a failed or cancelled job is as done as it will get
            else:
                progress += info.progress
        total = len(task_ids)
        return {
            "batch_id": batch_id,
            "created_at": batch["created_at"],
            "total": total,
            "counts": counts,
            "finished": finished,
            "progress": round(progress / total, 4) if total else 1.0,
            "done": finished == total,
            "task_ids": task_ids,
        }

    def queue_stats(self) -> dict[str, Any]:
        return self.task_manager.get_queue_stats()

    def cancel(self, task_id: str) -> tuple[str, TaskStatus]:
        """Cancel: ``revoked`` (was queued) or ``cancelling`` (running); 409 when finished."""
        outcome = self.task_manager.cancel(task_id)
        if outcome.outcome == "final":
            raise ConflictError(
                f"job {task_id} has already finished ({outcome.detail})",
                details={"status": outcome.detail},
            )
        info = self.store.get(task_id)
        return outcome.outcome, info.status if info else TaskStatus.REVOKED

    # -- following --------------------------------------------------------------------------
    async def job_exists(self, task_id: str) -> bool:
        return bool(await self.aio.exists(self.store.job_key(task_id)))

    async def follow(self, task_id: str, after: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The job's history, then its live events, until a final state.

        Subscribes before reading the history so nothing published in between is lost,
        then skips live events the history already held (same time stamp and content).
        ``after`` (an event's ``ts``, as sent in SSE ids) skips events up to it.
        """

        pubsub = self.aio.pubsub()
        try:
            try:
                await pubsub.subscribe(self.store.channel(task_id))
            except redis.exceptions.MaxConnectionsError:
                raise TransientError(
                    f"this API process already serves {MAX_FOLLOWERS} event streams; "
                    "retry later or poll the status"
                ) from None
            while True:  # the subscription is live once Redis confirms it
                message = await pubsub.get_message(timeout=5.0)
                if message is not None and message["type"] == "subscribe":
                    break
            history = await self.aio.lrange(self.store.history_key(task_id), 0, -1)
            last = _ts(after) if after else None
            seen_at_last: set[bytes | str] = set()
            for raw in history:
                event = json.loads(raw)
                ts = _ts(event.get("ts"))
                if last is not None and ts is not None and ts <= last:
                    continue
                if ts is not None and (last is None or ts > last):
                    last, seen_at_last = ts, set()
                seen_at_last.add(raw)
                yield event
                if event.get("state") in _FINAL_VALUES:
                    return
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is None or message["type"] != "message":
                    await asyncio.sleep(0)
                    continue
                raw = message["data"]
                event = json.loads(raw)
                ts = _ts(event.get("ts"))
                if last is not None and ts is not None:
                    if ts < last or (ts == last and raw in seen_at_last):
                        continue  # already sent from the history
                    if ts > last:
                        last, seen_at_last = ts, set()
                seen_at_last.add(raw)
                yield event
                if event.get("state") in _FINAL_VALUES:
                    return
        finally:
            await pubsub.aclose()


_FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _epoch(value: datetime | None) -> float:
    if value is None:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
