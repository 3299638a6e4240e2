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

Lost messages. kombu's Redis transport takes a message with BRPOP and records the delivery
in ``unacked`` in a second round trip. A message whose BRPOP reply never reaches the worker
(Redis shut down or the connection dropped at that instant; a SIGTERMed Redis drops the
replies of its last commands while its AOF keeps their effects) is on no queue and in no
worker's hands: only its job record, still PENDING, remembers it (celery/kombu#305). The
loop therefore looks for such jobs (``republish_lost``) when it starts, after every
Redis restart it notices (the server's ``run_id`` changed) or pass it missed, and every
``LOST_SWEEP_EVERY`` seconds, and queues them again from the submission the record keeps;
one that cannot be rebuilt ends as a FAILURE that says so. A duplicate (a message that
was only in flight) is harmless: the job record lets one delivery run it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import structlog
from kombu.utils import json as kombu_json

from morag.services.jobs import FINAL_STATES, RUNNING_STATES, JobStore, TaskInfo, TaskStatus

logger = structlog.get_logger(__name__)

LOST_SWEEP_EVERY = 600.0  # seconds between two routine looks for lost messages
LOST_LOOKBACK = 24 * 3600.0  # jobs created this long ago at most are looked at
LOST_SWEEP_LIMIT = 20_000  # jobs looked at per sweep


def is_left_over(
    job: TaskInfo | None, *, delivered_at: float, now: float, grace_seconds: float
) -> bool:
    """Whether an unacked message is a finished job's that its worker will never ack.

    A live worker acks a job's message a few milliseconds after the job ended (acks wait
    for the next delivery, core/broker.py); one that died in between leaves the message
    behind, to be delivered again only after the visibility timeout (hours), and counted
    as in flight until then. Past the grace period it is dropped: its job is final.
    """
    return job is not None and job.status in FINAL_STATES and now - delivered_at > grace_seconds


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
        confirm_seconds: float,
    ) -> None:
        self.app = app
        self.store = store
        self.interval = interval
        self.grace_seconds = grace_seconds
        self.confirm_seconds = confirm_seconds
        self._unleased_since: dict[bytes, float] = {}  # running jobs' tags seen without lease
        self._redis_run_id: str | None = None
        self._last_pass: float | None = None
        self._sweep_due: float | None = time.monotonic() + grace_seconds  # at start-up

    def run_once(self) -> list[str]:
        """One pass: restore messages of dead workers, and when due, queue again the jobs
        whose message was lost. Returns the ids of the jobs restored or queued again."""
        now = time.monotonic()
        if self._last_pass is not None and now - self._last_pass > 3 * self.interval:
            self._schedule_sweep(now)  # passes were missed: Redis away, or this process stalled
        restored = self._restore_unacked()
        if self._redis_restarted():
            self._schedule_sweep(now)
        self._last_pass = now
        if self._sweep_due is not None and now >= self._sweep_due:
            restored += self.republish_lost()
            self._sweep_due = now + LOST_SWEEP_EVERY  # (a failed sweep is tried next pass)
        return restored

    def _schedule_sweep(self, now: float) -> None:
        # after the grace period: workers reconnect and record what they were handed
        due = now + self.grace_seconds
        self._sweep_due = due if self._sweep_due is None else min(self._sweep_due, due)

    def _redis_restarted(self) -> bool:
        try:
            run_id = str(self.store.redis.info("server").get("run_id", ""))
        except Exception:  # INFO refused (some managed Redis): the other triggers remain
            return False
        restarted = self._redis_run_id is not None and run_id != self._redis_run_id
        self._redis_run_id = run_id
        return restarted

    def republish_lost(self) -> list[str]:
        """Queue again the PENDING jobs (older than the grace period) whose message is on no
        queue and in no worker's hands; returns their ids. See the module docstring."""
        from morag.core.config import ALL_QUEUES

        now = time.time()
        ids = self.store.list_ids(
            newest_first=False,
            start=now - LOST_LOOKBACK,
            end=now - self.grace_seconds,
            count=LOST_SWEEP_LIMIT,
        )
        waiting = [
            info
            for info in self.store.get_many(ids)
            if info is not None and info.status is TaskStatus.PENDING
        ]
        if not waiting:
            return []
        lock = self.store.keys.lost_sweep_lock
        if not self.store.redis.set(lock, "1", nx=True, px=int(self.grace_seconds * 1000)):
            return []  # another worker is sweeping
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            on_broker = _ids_on_broker(channel, ALL_QUEUES)
        lost = [info for info in waiting if info.task_id not in on_broker]
        for info in lost:
            self._queue_again(info)
        return [info.task_id for info in lost]

    def _queue_again(self, info: TaskInfo) -> None:
        raw = self.store.redis.hget(self.store.keys.job(info.task_id), "submission")
        submission = kombu_json.loads(raw) if raw else None
        if not submission or not submission.get("task"):
            message = (
                "the broker lost this job's message (Redis restarted or the connection "
                "dropped while delivering it) and the job cannot be queued again: submit it again"
            )
            self.store.finish(
                info.task_id,
                TaskStatus.FAILURE,
                message=message,
                error_type="MessageLost",
                error_message=message,
            )
            self.store.redis.hincrby(self.store.keys.metrics, "c|recovery|lost", 1)
            logger.error("job lost by the broker; failed", task_id=info.task_id)
            return
        # The event first: once sent, a worker may start the job before it is written.
        self.store.append_event(
            info.task_id,
            stage="requeued",
            message="the broker lost this job's message (Redis restarted while delivering "
            "it); queued again",
        )
        self.app.send_task(
            submission["task"],
            args=submission.get("args") or (),
            kwargs=submission.get("kwargs") or {},
            task_id=info.task_id,
            queue=info.queue or None,
            ignore_result=True,  # the record holds the result (see services/ingestion/publisher.py)
        )
        self.store.redis.hincrby(self.store.keys.metrics, "c|recovery|requeued", 1)
        logger.warning("job lost by the broker; queued again", task_id=info.task_id)

    def _restore_unacked(self) -> list[str]:
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
                if is_left_over(
                    job, delivered_at=delivered_at, now=now, grace_seconds=self.grace_seconds
                ):
                    channel.qos._remove_from_indices(tag).execute()  # kombu's, as its ack
                    logger.info(
                        "dropped the message of an ended job that its worker never acked",
                        task_id=task_id,
                        state=job.status.value if job else "unknown",
                    )
                    continue
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


def _ids_on_broker(channel: Any, queues: Any) -> set[str]:
    """Ids of the jobs with a message on a queue (any priority) or delivered and unacked,
    read in one transaction. kombu's client prefixes only some commands, so keys carry
    the broker namespace here."""
    prefix = getattr(channel, "global_keyprefix", "") or ""
    pipe = channel.client.pipeline(transaction=True)
    for queue in queues:
        for priority in channel.priority_steps:
            pipe.lrange(prefix + channel._q_for_pri(queue, priority), 0, -1)
    pipe.hvals(prefix + channel.unacked_key)
    *lists, unacked = pipe.execute()
    ids: set[str] = set()
    for raw in (item for items in lists for item in items):
        ids.add(str((json.loads(raw).get("headers") or {}).get("id", "")))
    for raw in unacked:
        ids.add(str((json.loads(raw)[0].get("headers") or {}).get("id", "")))
    return ids
