"""Delivering again the jobs whose worker died.

With ``acks_late`` a message stays in kombu's ``unacked`` hash until the worker acks it.
If the whole worker dies, kombu puts it back only after the visibility timeout, which
must stay above the longest hard time limit (or long jobs would run twice): hours. The
job record knows better. A running job holds a lease that its process refreshes; when
the lease is gone the process is gone, and the message can be restored at once. A message
whose job never started is restored once it has been unacked for longer than a grace
period (a live worker starts what it reserved within milliseconds with prefetch 1).

Every worker runs this loop at start-up and then every few seconds; restoring uses
kombu's own transactional ``restore_by_tag``, so two workers never restore a message twice.

A running job's missing lease is confirmed before its message is restored: it must still
be missing ``confirm_seconds`` (a third of the lease) after it was first seen missing. A
live process takes its lease back within a sixth of the lease when a Redis outage let it
expire (tasks/processing.py); restoring at first sight would hand that job to a second
process while the first still runs it (tests/reliability/test_redis_restart.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog

from morag.services.jobs import FINAL_STATES, RUNNING_STATES, JobStore, TaskInfo, TaskStatus

logger = structlog.get_logger(__name__)


def should_restore(
    job: TaskInfo | None, *, leased: bool, delivered_at: float, now: float, grace_seconds: float
) -> bool:
    """Whether an unacked message of this job belongs to a dead worker."""
    if job is not None and job.status in FINAL_STATES:
        return False  # nothing to do; whoever holds it acks or drops it
    if leased:
        return False  # a live process runs it
    if job is not None and job.status in RUNNING_STATES:
        return True  # started, and its process stopped refreshing the lease
    if job is not None and job.status is TaskStatus.RETRY and job.retry_at is not None:
        return now > job.retry_at.timestamp() + grace_seconds
    return now - delivered_at > grace_seconds


class RecoveryLoop:
    """Restores messages of dead workers; ``run_once`` is called every few seconds."""

    def __init__(
        self,
        app: Any,
        store: JobStore,
        *,
        interval: float,
        grace_seconds: float,
        confirm_seconds: float | None = None,
    ) -> None:
        from morag.core.config import settings

        self.app = app
        self.store = store
        self.interval = interval
        self.grace_seconds = grace_seconds
        self.confirm_seconds = (
            settings.lease_seconds / 3 if confirm_seconds is None else confirm_seconds
        )
        self._unleased_since: dict[bytes, float] = {}  # running jobs' tags seen without lease

    def run_once(self) -> list[str]:
        """One pass over the unacked messages; returns the ids of the jobs restored."""
        restored: list[str] = []
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            client = channel.client
            now = time.time()
            entries = client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
            seen = {tag for tag, _ in entries}
            for tag in [t for t in self._unleased_since if t not in seen]:
                del self._unleased_since[tag]
            for tag, delivered_at in entries:
                raw = client.hget(channel.unacked_key, tag)
                if not raw:
                    continue  # acked meanwhile
                message = json.loads(raw)[0]
                task_id = (message.get("headers") or {}).get("id")
                if not task_id:
                    continue
                job = self.store.get(task_id)
                leased = self.store.has_lease(task_id)
                if leased:
                    self._unleased_since.pop(tag, None)
                if should_restore(
                    job,
                    leased=leased,
                    delivered_at=delivered_at,
                    now=now,
                    grace_seconds=self.grace_seconds,
                ):
                    if job is not None and job.status in RUNNING_STATES:
                        first_seen = self._unleased_since.setdefault(tag, now)
                        if now - first_seen < self.confirm_seconds:
                            continue  # its process may be taking the lease back
                    self._unleased_since.pop(tag, None)
                    channel.qos.restore_by_tag(tag, client)
                    restored.append(task_id)
                    logger.warning(
                        "restored a job whose worker died",
                        task_id=task_id,
                        state=job.status.value if job else "unknown",
                        unacked_for=round(now - delivered_at, 1),
                    )
        return restored
