"""Webhooks: a signed JSON event to the job's ``webhook_url`` when the job ends.

Nothing lost, nothing blocking:

1. Every transition to a final state is a Lua script in ``services/jobs.py``; when the job
   has a ``webhook_url``, the same script appends ``{task_id, state, ts}`` to the outbox
   list ``<prefix>:webhooks:outbox``. The webhook is owed the moment the job ends.
2. ``WebhookOutbox.dispatch`` (run by every worker's maintenance thread) moves each entry,
   atomically, from the outbox to the in-flight set ``<prefix>:webhooks:inflight`` (scored
   by claim time), publishes a delivery task, then removes it from the set. An entry whose
   dispatcher died between claim and publish is moved back after ``stale_after`` seconds.
3. The delivery task (``tasks/webhook_tasks.py``) makes one bounded POST per attempt
   through the SSRF guard and retries with exponential backoff by countdown, so a receiver
   that hangs holds a worker slot for at most ``webhook_timeout_seconds`` per attempt.
   Every attempt is written to the job's history (stage ``webhook``).

Delivery is at least once: a crash after a POST and before its bookkeeping sends the
event again. The ``webhook-id`` header is the same for every attempt and copy of one
event, so receivers can drop duplicates, as Standard Webhooks intends.

Per delivery, under ``<prefix>:``: ``job:webhook-<id>:lease`` names the copy of the
delivery message in charge (the recovery loop leaves leased messages alone, including one
waiting for its retry countdown); ``webhooks:done:<id>`` marks a delivery that ended.

Signing: Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature:
v1,<base64 HMAC-SHA256 of "id.timestamp.body">``) with ``settings.webhook_secret``. With
no secret configured events go out unsigned, and the worker logs a warning once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
import structlog
from standardwebhooks import Webhook

from morag.core.errors import ForbiddenTargetError, InvalidInputError, MoragError
from morag.core.url_guard import PostResult, UrlPolicy, post, validate_url
from morag.services.jobs import JobStore, TaskInfo, TaskStatus, utcnow

if TYPE_CHECKING:
    from celery import Celery

    from morag.core.config import Settings

logger = structlog.get_logger(__name__)

DELIVERY_TASK = "morag.tasks.webhook_tasks.deliver_webhook"
EVENT_TYPES = {
    TaskStatus.SUCCESS.value: "job.succeeded",
    TaskStatus.FAILURE.value: "job.failed",
    TaskStatus.REVOKED.value: "job.cancelled",
}
BACKOFF_FACTOR = 3  # 2, 6, 18, 54, 162 s: six attempts span about five minutes
LEASE_MARGIN_SECONDS = 30.0  # a delivery's lease outlives its attempt or countdown by this

_warned_unsigned = False


# --- the event ---------------------------------------------------------------------------


def delivery_id(task_id: str) -> str:
    """The Celery task id of a job's webhook delivery (one final event per job)."""
    return f"webhook-{task_id}"


def message_id(task_id: str, state: str) -> str:
    """The ``webhook-id``: the same for every attempt at one event."""
    return f"msg_{task_id}_{state}"


def build_event(info: TaskInfo, state: str, ts: str) -> dict[str, Any]:
    """The JSON body: Standard Webhooks' ``{type, timestamp, data}`` envelope."""
    record = info.to_dict()
    data = {
        key: record[key]
        for key in (
            "task_id",
            "status",
            "kind",
            "message",
            "attempts",
            "created_at",
            "started_at",
            "finished_at",
            "error",
            "result",
            "metadata",
            "batch_id",
            "retry_of",
        )
    }
    data["status"] = state  # the state that owed this event (final states never change)
    return {"type": EVENT_TYPES[state], "timestamp": ts, "data": data}


def encode_event(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(body: bytes, msg_id: str, secret: str, now: datetime) -> dict[str, str]:
    """Standard Webhooks headers; no signature when ``secret`` is empty."""
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
    }
    if secret:
        headers["webhook-signature"] = Webhook(secret).sign(msg_id, now, body.decode())
    else:
        global _warned_unsigned
        if not _warned_unsigned:
            _warned_unsigned = True
            logger.warning(
                "MORAG_WEBHOOK_SECRET is not set: webhooks are sent unsigned, so receivers "
                "cannot tell them from forgeries"
            )
    return headers


def retry_delay(attempt: int, base_seconds: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    return float(base_seconds * BACKOFF_FACTOR ** (attempt - 1))


# --- the outbox --------------------------------------------------------------------------

# KEYS: outbox, inflight | ARGV: now, stale_before, max
# Moves stale in-flight entries back to the outbox, then claims up to max entries.
_CLAIM = """
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
for _, entry in ipairs(stale) do
  redis.call('LPUSH', KEYS[1], entry)
  redis.call('ZREM', KEYS[2], entry)
end
local claimed = {}
for i = 1, tonumber(ARGV[3]) do
  local entry = redis.call('LPOP', KEYS[1])
  if not entry then break end
  redis.call('ZADD', KEYS[2], ARGV[1], entry)
  claimed[#claimed + 1] = entry
end
return claimed
"""

# KEYS: outbox, inflight | ARGV: entry — give a claimed entry back (publishing failed)
_RELEASE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then redis.call('LPUSH', KEYS[1], ARGV[1]) end
"""

Publisher = Callable[[dict[str, Any]], None]


def celery_publisher(app: Celery) -> Publisher:
    """Publish a delivery task by name (the dispatcher needs no task module)."""

    def publish(entry: dict[str, Any]) -> None:
        app.send_task(
            DELIVERY_TASK,
            kwargs={
                "task_id": entry["task_id"],
                "state": entry["state"],
                "nonce": uuid.uuid4().hex,
            },
            task_id=delivery_id(entry["task_id"]),
        )

    return publish


class WebhookOutbox:
    """Moves owed webhooks from the outbox to delivery tasks, losing none (module doc)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        publish: Publisher,
        *,
        stale_after: float = 30.0,
        batch: int = 100,
    ) -> None:
        self.redis = client
        self.publish = publish
        self.stale_after = stale_after
        self.batch = batch
        self.outbox_key = f"{prefix}:webhooks:outbox"  # the key JobStore.outbox_key names
        self.inflight_key = f"{prefix}:webhooks:inflight"
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    def dispatch(self) -> int:
        """Publish a delivery task for every entry in the outbox; returns how many."""
        sent = 0
        while True:
            now = time.time()
            entries = self._claim(
                keys=[self.outbox_key, self.inflight_key],
                args=[now, now - self.stale_after, self.batch],
            )
            for n, raw in enumerate(entries):
                try:
                    self.publish(json.loads(raw))
                except Exception as exc:  # broker away: give the rest back for the next round
                    logger.warning("webhook dispatch failed", entry=raw, error=str(exc))
                    for unsent in reversed(entries[n:]):  # LPUSH: keep their order
                        self._release(keys=[self.outbox_key, self.inflight_key], args=[unsent])
                    return sent
                self.redis.zrem(self.inflight_key, raw)
                sent += 1
            if len(entries) < self.batch:
                return sent

    def backlog(self) -> tuple[int, int]:
        """(entries waiting in the outbox, entries claimed and not yet published)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(self.outbox_key)
        pipe.zcard(self.inflight_key)
        waiting, inflight = pipe.execute()
        return int(waiting), int(inflight)


# --- delivery ----------------------------------------------------------------------------

# KEYS: lease, done | ARGV: nonce, ttl_ms
# ok: this copy is in charge | done: delivery ended | busy: another copy is in charge
_CLAIM_DELIVERY = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 'done' end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 'busy' end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 'ok'
"""


@dataclass(frozen=True)
class DeliveryResult:
    """What one attempt did: ``outcome`` in delivered | retrying | failed | refused |
    gone (no record or URL) | skipped (done already, or another copy is in charge)."""

    outcome: str
    retry_in: float | None = None
    status: int | None = None


class WebhookSender:
    """One delivery attempt at a time: claim, POST through the guard, record, decide."""

    def __init__(self, store: JobStore, cfg: Settings, policy: UrlPolicy | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.policy = policy or UrlPolicy.from_settings(cfg)
        self._claim = store.redis.register_script(_CLAIM_DELIVERY)

    def _lease_key(self, task_id: str) -> str:
        # the lease key the recovery loop checks for the delivery's Celery task id
        return self.store.lease_key(delivery_id(task_id))

    def _done_key(self, task_id: str) -> str:
        return f"{self.store.prefix}:webhooks:done:{task_id}"

    def _hold(self, task_id: str, nonce: str, seconds: float) -> str:
        answer = self._claim(
            keys=[self._lease_key(task_id), self._done_key(task_id)],
            args=[nonce, int(seconds * 1000)],
        )
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def _end(self, task_id: str) -> None:
        pipe = self.store.redis.pipeline(transaction=True)
        pipe.set(self._done_key(task_id), "1", ex=self.store.retention_seconds)
        pipe.delete(self._lease_key(task_id))
        pipe.execute()

    def _record(self, task_id: str, message: str, **extra: Any) -> None:
        self.store.append_event(task_id, stage="webhook", message=message, extra=extra)

    def deliver(self, task_id: str, state: str, attempt: int, nonce: str) -> DeliveryResult:
        """Make attempt number ``attempt`` (1-based) at the job's webhook."""
        timeout = self.cfg.webhook_timeout_seconds
        claim = self._hold(task_id, nonce, timeout + LEASE_MARGIN_SECONDS)
        log = logger.bind(task_id=task_id, event_state=state, attempt=attempt)
        if claim != "ok":
            log.info("webhook delivery skipped", reason=claim)
            return DeliveryResult("skipped")
        info = self.store.get(task_id)
        if info is None or not info.webhook_url:
            self._end(task_id)
            log.warning("webhook dropped: the job record or its URL is gone")
            return DeliveryResult("gone")
        common = {"webhook_event": EVENT_TYPES[state], "delivery_attempt": attempt}
        try:
            validate_url(info.webhook_url, self.policy)  # before any DNS or connection
            response: PostResult | None = self._post(info, state)
            failure = ""
        except (ForbiddenTargetError, InvalidInputError) as exc:
            # a refused target or a URL that cannot work is never retried; a name that
            # does not resolve (yet), or a bad certificate, may be fixed by its owner
            if isinstance(exc, ForbiddenTargetError) or not _may_recover(exc):
                self._end(task_id)
                self._record(
                    task_id, f"webhook refused: {exc.message}", webhook_outcome="refused", **common
                )
                log.warning("webhook refused", reason=exc.message)
                return DeliveryResult("refused")
            response, failure = None, exc.message
        except MoragError as exc:  # timeouts, connection failures
            response, failure = None, exc.message
        status = response.status if response is not None else None
        if response is not None and 200 <= response.status < 300:
            self._end(task_id)
            self._record(
                task_id,
                f"webhook delivered ({status})",
                webhook_outcome="delivered",
                webhook_status=status,
                **common,
            )
            log.info("webhook delivered", status=status)
            return DeliveryResult("delivered", status=status)
        reason = f"HTTP {status}" if response is not None else failure
        if attempt >= self.cfg.webhook_max_attempts:
            self._end(task_id)
            self._record(
                task_id,
                f"webhook failed ({reason}); gave up after {attempt} attempts",
                webhook_outcome="failed",
                webhook_status=status,
                **common,
            )
            log.warning("webhook failed for good", reason=reason)
            return DeliveryResult("failed", status=status)
        delay = retry_delay(attempt, self.cfg.webhook_backoff_seconds)
        # the retry waits in a worker's memory, unacked: the lease keeps recovery off it
        self._hold(task_id, nonce, delay + timeout + LEASE_MARGIN_SECONDS)
        self._record(
            task_id,
            f"webhook failed ({reason}), retry in {delay:g} s",
            webhook_outcome="retrying",
            webhook_status=status,
            retry_in=delay,
            **common,
        )
        log.info("webhook failed; retrying", reason=reason, retry_in=delay)
        return DeliveryResult("retrying", retry_in=delay, status=status)

    def _post(self, info: TaskInfo, state: str) -> PostResult:
        assert info.webhook_url is not None
        ts = (info.finished_at or utcnow()).isoformat()
        body = encode_event(build_event(info, state, ts))
        headers = signed_headers(
            body, message_id(info.task_id, state), self.cfg.webhook_secret, utcnow()
        )
        return post(
            info.webhook_url,
            self.policy,
            content=body,
            headers=headers,
            timeout=self.cfg.webhook_timeout_seconds,
        )


def _may_recover(exc: InvalidInputError) -> bool:
    """Whether a request-time error could pass without the URL changing."""
    return exc.message.startswith(("cannot resolve host", "TLS certificate"))
