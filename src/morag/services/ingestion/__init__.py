"""The ingestion domain: what the API does, without HTTP.

Each part owns one concern and receives its settings and clients when it is built, once
per API app (``IngestionService``, in ``create_app``):

- ``specs``: checking a submission into a ``JobSpec`` (pure: no Redis, no Celery);
- ``idempotency``: the Idempotency-Key flow every submitting request runs through;
- ``publisher``: the job record, then the task message, sent by name;
- ``submissions``: submit, batch, retry, cancel;
- ``reads``: status, result, history, artefacts, the job list, batches, queue stats;
- ``follower``: a job's live events (SSE), over one pub/sub connection per process;
- ``stream_slots``: how many event streams each owner, and the process, hold at once.
"""

from __future__ import annotations

from celery import Celery

from morag.core.config import Settings
from morag.core.redis_conn import get_redis
from morag.services.ingestion.follower import JobFollower
from morag.services.ingestion.idempotency import IdempotencyKeys
from morag.services.ingestion.publisher import JobPublisher
from morag.services.ingestion.reads import JobReads
from morag.services.ingestion.specs import JobSpec, SubmissionChecks, normalise_url
from morag.services.ingestion.stream_slots import StreamSlots
from morag.services.ingestion.submissions import BatchSubmission, Submission, Submissions
from morag.services.jobs import JobStore
from morag.services.task_manager import TaskManager

__all__ = [
    "BatchSubmission",
    "IngestionService",
    "JobSpec",
    "Submission",
    "SubmissionChecks",
    "normalise_url",
]


class IngestionService:
    """The ingestion parts, built from one ``Settings`` and one Celery app."""

    def __init__(self, cfg: Settings, celery: Celery) -> None:
        assert cfg.artifact_dir is not None
        self.settings = cfg
        self.store = JobStore(
            get_redis(cfg.redis_url), cfg.key_prefix, cfg.result_retention_seconds
        )
        self.task_manager = TaskManager(app=celery, cfg=cfg, store=self.store)
        self.checks = SubmissionChecks(cfg)
        self.submissions = Submissions(
            self.store,
            JobPublisher(self.store, celery),
            IdempotencyKeys(self.store.redis, self.store.keys, cfg.result_retention_seconds),
            self.checks,
            self.task_manager,
        )
        self.reads = JobReads(self.store, self.task_manager, cfg.artifact_dir, cfg.redis_url)
        self.follower = JobFollower(self.store.keys, cfg.redis_url)
        self.streams = StreamSlots(cfg.sse_max_streams_per_owner, cfg.sse_max_streams)

    def stop_streams(self) -> None:
        """End every event stream (the server is shutting down)."""
        self.follower.hub.stop_followers()

    async def aclose(self) -> None:
        await self.reads.aclose()
        await self.follower.aclose()
        self.submissions.close()
