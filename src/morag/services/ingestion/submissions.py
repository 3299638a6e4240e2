"""Submitting, batching, retrying and cancelling jobs.

Two keys keep repeats cheap and safe: an Idempotency-Key answers a repeated request with
its original job (idempotency.py); identical content (the spec's ``content_key``) while its
job is queued or running joins that job instead of queuing a duplicate (the record's
create script, services/jobs.py). Batches are ``<prefix>:batch:<id>`` strings listing
their jobs. A failed or cancelled job is re-run as a new job with ``retry_of``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from morag.core.errors import ConflictError, InvalidInputError
from morag.core.principals import ANONYMOUS, Principal
from morag.services.ingestion.idempotency import IdempotencyKeys
from morag.services.ingestion.publisher import JobPublisher, kind_of_task
from morag.services.ingestion.reads import not_found
from morag.services.ingestion.specs import JobSpec, SubmissionChecks, digest
from morag.services.jobs import JobStore, TaskStatus, utcnow
from morag.services.retention import input_for_retry, input_gone
from morag.services.uploads import stored_name

if TYPE_CHECKING:
    from morag.services.task_manager import TaskManager

#: Threads that run ``asubmit``'s submissions for the event loop: few, since they take
#: turns on the GIL; two overlap a submission's two Redis round trips (record, message).
SUBMIT_THREADS = 2


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


class Submissions:
    def __init__(
        self,
        store: JobStore,
        publisher: JobPublisher,
        idempotency: IdempotencyKeys,
        checks: SubmissionChecks,
        task_manager: TaskManager,
    ) -> None:
        self.store = store
        self.redis: redis.Redis = store.redis
        self.publisher = publisher
        self.idempotency = idempotency
        self.checks = checks
        self.task_manager = task_manager
        self.retention_seconds = store.retention_seconds
        self._threads: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None

    def _existing(self, task_id: str, message: str, **flags: bool) -> Submission:
        info = self.store.get(task_id)
        status = info.status if info else TaskStatus.PENDING
        return Submission(task_id, status, message, **flags)

    def submit(
        self,
        spec: JobSpec,
        *,
        principal: Principal = ANONYMOUS,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Queue one job of the caller's, or answer the job an identical earlier request or
        work of the caller's created."""

        def run(record: dict[str, Any]) -> Submission:
            task_id = record["task_id"]
            worker_id = self.publisher.publish(spec, task_id, owner=principal.name)
            if worker_id == task_id:
                return Submission(task_id, TaskStatus.PENDING, "queued for processing")
            spec.discard_upload()
            record["task_id"] = worker_id
            return self._existing(
                worker_id,
                "identical content is already queued or running: this is that job",
                duplicate=True,
            )

        def replay(record: dict[str, Any]) -> Submission:
            spec.discard_upload()
            return self._existing(
                record["task_id"],
                "repeated request (same Idempotency-Key): this is the original job",
                replayed=True,
            )

        fingerprint = digest({"op": "job", "request": spec.request_key}) if idempotency_key else ""
        return self.idempotency.once(
            principal.name,
            idempotency_key,
            fingerprint,
            {"task_id": str(uuid.uuid4())},
            run,
            replay,
        )

    async def asubmit(
        self,
        spec: JobSpec,
        *,
        principal: Principal = ANONYMOUS,
        idempotency_key: str | None = None,
    ) -> Submission:
        """``submit`` from the event loop, on this service's submission threads (Celery
        publishes with blocking calls). A cancelled caller does not stop the submission."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(SUBMIT_THREADS, "morag-submit")
        call = functools.partial(
            self.submit, spec, principal=principal, idempotency_key=idempotency_key
        )
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)

    def submit_batch(
        self,
        specs: list[JobSpec],
        *,
        principal: Principal = ANONYMOUS,
        idempotency_key: str | None = None,
    ) -> BatchSubmission:
        """Queue checked items as one batch (each identical to active work joins that job)."""
        if not specs:
            raise InvalidInputError("a batch needs at least one item", details={"field": "items"})
        self.checks.check_batch_size(len(specs))

        def run(record: dict[str, Any]) -> BatchSubmission:
            batch_id, task_ids = record["batch_id"], record["task_ids"]
            submissions: list[Submission] = []
            try:
                for index, (spec, task_id) in enumerate(zip(specs, task_ids, strict=True)):
                    worker_id = self.publisher.publish(
                        spec, task_id, owner=principal.name, batch_id=batch_id
                    )
                    if worker_id == task_id:
                        submissions.append(Submission(task_id, TaskStatus.PENDING, "queued"))
                        continue
                    spec.discard_upload()
                    task_ids[index] = worker_id  # duplicates answer the jobs they joined
                    submissions.append(
                        self._existing(worker_id, "already queued or running", duplicate=True)
                    )
            except BaseException:
                # Jobs already recorded stay: the record queues a job whose publish failed
                # again (services/recovery.py).
                for spec in specs[len(submissions) :]:
                    spec.discard_upload()  # never published: nobody will read these files
                raise
            self.redis.set(
                self.store.keys.batch(batch_id),
                json.dumps(
                    {
                        "created_at": utcnow().isoformat(),
                        "owner": principal.name,
                        "task_ids": task_ids,
                    }
                ),
                ex=self.retention_seconds,
            )
            return BatchSubmission(batch_id, task_ids, submissions=submissions)

        def replay(record: dict[str, Any]) -> BatchSubmission:
            for spec in specs:
                spec.discard_upload()
            return BatchSubmission(record["batch_id"], record["task_ids"], replayed=True)

        fingerprint = digest({"op": "batch", "items": [s.request_key for s in specs]})
        fresh = {"batch_id": str(uuid.uuid4()), "task_ids": [str(uuid.uuid4()) for _ in specs]}
        return self.idempotency.once(
            principal.name, idempotency_key, fingerprint, fresh, run, replay
        )

    def retry(
        self,
        task_id: str,
        *,
        principal: Principal = ANONYMOUS,
        idempotency_key: str | None = None,
    ) -> Submission:
        """Run a failed or cancelled job of the caller's again as a new job with the same
        input, owned by the job's owner."""

        def run(record: dict[str, Any]) -> Submission:
            new_id = record["task_id"]
            spec, owned_input, owner = self._retry_spec(task_id, new_id, principal)
            job_key = self.store.keys.job(task_id)
            # One retry per job, even for two concurrent requests: the first one wins.
            if not self.redis.hsetnx(job_key, "retried_by", new_id):
                earlier = _text(self.redis.hget(job_key, "retried_by"))
                raise ConflictError(
                    f"job {task_id} was already retried as {earlier}; retry that job if it "
                    "failed too",
                    details={"retried_by": earlier},
                )
            try:
                if owned_input:
                    # Its own name for the file: the failed job's is deleted with that job.
                    path = Path(spec.kwargs["file_path"])
                    linked = input_for_retry(path, stored_name(path.name), task_id=task_id)
                    spec.kwargs["file_path"] = spec.retry_input = str(linked)
                self.publisher.publish(spec, new_id, owner=owner, retry_of=task_id)
            except BaseException:
                if spec.retry_input:
                    Path(spec.retry_input).unlink(missing_ok=True)
                self.redis.hdel(job_key, "retried_by")
                raise
            return Submission(
                new_id, TaskStatus.PENDING, f"queued again as a new job (retry of {task_id})"
            )

        def replay(record: dict[str, Any]) -> Submission:
            return self._existing(
                record["task_id"],
                "repeated request (same Idempotency-Key): this is the retry it created",
                replayed=True,
            )

        fingerprint = digest({"op": "retry", "task_id": task_id})
        return self.idempotency.once(
            principal.name,
            idempotency_key,
            fingerprint,
            {"task_id": str(uuid.uuid4())},
            run,
            replay,
        )

    def _retry_spec(
        self, task_id: str, new_id: str, principal: Principal
    ) -> tuple[JobSpec, bool, str]:
        """The spec a failed or cancelled job was submitted with, whether its input file is
        the job's own (an upload), and its owner; 404, 409 or 410 (input deleted) otherwise."""
        info = self.store.get(task_id)
        if info is None or not principal.may_see(info.owner):
            raise not_found(task_id)
        if info.status not in (TaskStatus.FAILURE, TaskStatus.REVOKED):
            raise ConflictError(
                f"job {task_id} is {info.status.value}; only failed or cancelled jobs can be "
                "retried",
                details={"status": info.status.value},
            )
        raw_submission, content_key, raw_owned = self.redis.hmget(
            self.store.keys.job(task_id), "submission", "content_key", "owned_files"
        )
        if not raw_submission:
            raise ConflictError(
                f"job {task_id} was not submitted through the API, so its "
                "input is not known; submit it again",
                details={"status": info.status.value},
            )
        submission = json.loads(raw_submission)
        file_path = submission["kwargs"].get("file_path")
        owned_input = bool(file_path) and file_path in json.loads(_text(raw_owned) or "[]")
        if file_path and not Path(file_path).is_file():
            if owned_input:
                raise input_gone(task_id)
            raise ConflictError(
                f"the input file of job {task_id} is no longer stored; submit it again",
                details={"status": info.status.value},
            )
        kind = kind_of_task(submission.get("task", ""))
        if kind is None:
            raise ConflictError(
                f"job {task_id} ran a task the API does not submit",
                details={"status": info.status.value},
            )
        spec = JobSpec(
            kind=kind,
            kwargs=dict(submission["kwargs"]),
            webhook_url=info.webhook_url,
            content_key=_text(content_key) or new_id,
            request_key="",
        )
        return spec, owned_input, info.owner

    def cancel(self, task_id: str, principal: Principal = ANONYMOUS) -> tuple[str, TaskStatus]:
        """Cancel a job of the caller's: ``revoked`` (was queued) or ``cancelling``
        (running); 409 when finished."""
        info = self.store.get(task_id)
        if info is not None and not principal.may_see(info.owner):
            raise not_found(task_id)
        if info is None and not principal.admin:
            raise not_found(task_id)  # only an admin may cancel a task without a record
        outcome = self.task_manager.cancel(task_id)
        if outcome.outcome == "final":
            raise ConflictError(
                f"job {task_id} has already finished ({outcome.detail})",
                details={"status": outcome.detail},
            )
        info = self.store.get(task_id)
        return outcome.outcome, info.status if info else TaskStatus.REVOKED


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
