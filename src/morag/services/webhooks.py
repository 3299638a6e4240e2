"""Webhooks: a signed JSON event to the job's ``webhook_url`` when the job ends.

Nothing lost:

1. Every transition to a final state is a Lua script in ``services/jobs.py``; when the job
   has a ``webhook_url``, the same script appends ``{task_id, state, ts}`` to the outbox
   list ``<prefix>:webhooks:outbox``. The webhook is owed the moment the job ends.
2. ``WebhookOutbox.claim`` moves entries, atomically, from the outbox to the in-flight set
   ``<prefix>:webhooks:inflight``, scored by a lease deadline. ``settle`` removes an entry
   when its attempt is over and, in the same script, schedules the next attempt in
   ``<prefix>:webhooks:scheduled`` (scored by when it is due). An entry whose lease passes
   (its process died mid-attempt) and a retry that falls due go back to the outbox on the
   next ``claim`` by any worker.

Nothing blocking: attempts run on a small thread pool in each worker's main process
(``WebhookDispatcher``, fed by the worker's maintenance thread), never in the process
pool that runs jobs. A receiver that hangs holds one delivery thread for at most
``webhook_timeout_seconds`` per attempt; jobs and the API never wait for it (a task per
delivery would let slow receivers hold the job processes).

Delivery is at least once: a crash after a POST and before its bookkeeping sends the
event again. The ``webhook-id`` header is the same for every attempt and copy of one
event, so receivers can drop duplicates, as Standard Webhooks intends.
``<prefix>:webhooks:done:<id>`` marks a delivery that ended (a late copy does nothing).

Every attempt is written to the job's history (stage ``webhook``) and logged, naming the
target as ``redact_url`` shows it (its token stays in the record, for delivery alone).
Targets pass the same SSRF guard as ingested URLs, checked again at each attempt (DNS may
have moved).

Signing: Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature:
v1,<base64 HMAC-SHA256 of "id.timestamp.body">``) with ``settings.webhook_secret``. With
no secret configured events go out unsigned, and the sender logs a warning once.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import redis
import structlog
from standardwebhooks import Webhook

from morag.core.errors import ForbiddenTargetError, InvalidInputError, MoragError
from morag.core.keys import RedisKeys
from morag.core.redaction import redact_url
from morag.core.url_guard import PostResult, UrlPolicy, post, validate_url
from morag.services.jobs import JobStore, TaskInfo, TaskStatus, utcnow

if TYPE_CHECKING:
    from morag.core.config import Settings

logger = structlog.get_logger(__name__)

EVENT_TYPES = {
    TaskStatus.SUCCESS.value: "job.succeeded",
    TaskStatus.FAILURE.value: "job.failed",
    TaskStatus.REVOKED.value: "job.cancelled",
}
BACKOFF_FACTOR = 3  # 2, 6, 18, 54, 162 s: six attempts span about five minutes
LEASE_MARGIN_SECONDS = 30.0  # an in-flight entry is stale this long after its attempt's end

_warned_unsigned = False


# --- the event ---------------------------------------------------------------------------


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

# KEYS: outbox, inflight, scheduled, claim counter | ARGV: now, lease_deadline, max
# Due retries and stale claims go back to the outbox, then up to max entries are claimed.
# An in-flight member is "<claim number>|<entry>": a stale claim handed out again is a
# different member, so the late settle of the first claimer cannot end the second's.
_CLAIM = """
for _, entry in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1])) do
  redis.call('RPUSH', KEYS[1], entry)
  redis.call('ZREM', KEYS[3], entry)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  redis.call('LPUSH', KEYS[1], string.sub(member, string.find(member, '|', 1, true) + 1))
  redis.call('ZREM', KEYS[2], member)
end
local claimed = {}
for i = 1, tonumber(ARGV[3]) do
  local entry = redis.call('LPOP', KEYS[1])
  if not entry then break end
  local member = redis.call('INCR', KEYS[4]) .. '|' .. entry
  redis.call('ZADD', KEYS[2], ARGV[2], member)
  claimed[#claimed + 1] = member
end
return claimed
"""

# KEYS: inflight, scheduled, metrics | ARGV: claim member, next_entry, due, outcome
# Ends a claim; schedules the next attempt only if the claim was still this process's
# (a claim that went stale was handed out again, and that copy decides), and counts the
# attempt's outcome once, with it (services/metrics.py).
_SETTLE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2]) end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[3], 'c|webhook|' .. ARGV[4], 1) end
return 1
"""


@dataclass(frozen=True)
class OutboxEntry:
    """One owed event and which attempt is next; ``claim`` is its in-flight member."""

    task_id: str
    state: str
    ts: str
    attempt: int
    claim: str = ""

    @classmethod
    def parse(cls, raw: bytes | str) -> OutboxEntry:
        """From an outbox entry (JSON) or an in-flight member (``<n>|<JSON>``)."""
        text = raw.decode() if isinstance(raw, bytes) else raw
        claim = text if not text.startswith("{") else ""
        value = json.loads(text.split("|", 1)[1] if claim else text)
        return cls(
            value["task_id"], value["state"], value.get("ts", ""), value.get("attempt", 1), claim
        )

    def next_attempt(self) -> str:
        return json.dumps(
            {
                "task_id": self.task_id,
                "state": self.state,
                "ts": self.ts,
                "attempt": self.attempt + 1,
            }
        )


class WebhookOutbox:
    """The outbox, in-flight and scheduled sets (module doc); shared by all workers."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        keys = RedisKeys(prefix)
        self.outbox_key = keys.webhook_outbox  # where final transitions queue webhooks
        self.inflight_key = keys.webhook_inflight
        self.scheduled_key = keys.webhook_scheduled
        self.counter_key = keys.webhook_claims
        self.metrics_key = keys.metrics
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE)

    def claim(self, count: int, lease_seconds: float) -> list[OutboxEntry]:
        """Take up to ``count`` owed events for ``lease_seconds`` (then they are stale)."""
        if count <= 0:
            return []
        now = time.time()
        raws = self._claim(
            keys=[self.outbox_key, self.inflight_key, self.scheduled_key, self.counter_key],
            args=[now, now + lease_seconds, count],
        )
        return [OutboxEntry.parse(raw) for raw in raws]

    def settle(self, entry: OutboxEntry, retry_in: float | None = None, outcome: str = "") -> bool:
        """End a claim, scheduling the next attempt ``retry_in`` s from now if given, and
        count the attempt's ``outcome`` (a ``DeliveryResult.outcome``).

        False when the claim had gone stale (another worker owns the event now).
        """
        next_entry = entry.next_attempt() if retry_in is not None else ""
        due = time.time() + (retry_in or 0.0)
        return bool(
            self._settle(
                keys=[self.inflight_key, self.scheduled_key, self.metrics_key],
                args=[entry.claim, next_entry, due, outcome],
            )
        )

    def backlog(self) -> tuple[int, int, int]:
        """(owed and waiting, being attempted, waiting for a retry)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(self.outbox_key)
        pipe.zcard(self.inflight_key)
        pipe.zcard(self.scheduled_key)
        waiting, inflight, scheduled = pipe.execute()
        return int(waiting), int(inflight), int(scheduled)


# --- one attempt -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryResult:
    """What one attempt did: ``outcome`` in delivered | retrying | failed | refused |
    gone (no record or URL) | skipped (the delivery had ended already)."""

    outcome: str
    retry_in: float | None = None
    status: int | None = None


class WebhookSender:
    """Makes one attempt: POST through the guard, record it in the history, decide what
    comes next (nothing, or a retry after a backoff)."""

    def __init__(self, store: JobStore, cfg: Settings, policy: UrlPolicy | None = None) -> None:
        self.store = store
        self.cfg = cfg
        self.policy = policy or UrlPolicy.from_settings(cfg)

    def _end(self, task_id: str) -> None:
        self.store.redis.set(
            self.store.keys.webhook_done(task_id), "1", ex=self.store.retention_seconds
        )

    def _record(self, task_id: str, message: str, **extra: Any) -> None:
        self.store.append_event(task_id, stage="webhook", message=message, extra=extra)

    def deliver(self, entry: OutboxEntry) -> DeliveryResult:
        """Make attempt number ``entry.attempt`` at the job's webhook."""
        task_id, state, attempt = entry.task_id, entry.state, entry.attempt
        log = logger.bind(task_id=task_id, event_state=state, attempt=attempt)
        if self.store.redis.exists(self.store.keys.webhook_done(task_id)):
            return DeliveryResult("skipped")
        info = self.store.get(task_id)
        if info is None or not info.webhook_url or state not in EVENT_TYPES:
            self._end(task_id)
            log.warning("webhook dropped: the job record or its URL is gone")
            return DeliveryResult("gone")
        # Logs and history name the target without secrets; errors from ``post`` do too.
        log = log.bind(webhook=redact_url(info.webhook_url))
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
                    task_id,
                    f"webhook refused: {exc.message}",
                    webhook_outcome="refused",
                    **common,
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


# --- the delivery pool -------------------------------------------------------------------


class WebhookDispatcher:
    """Runs attempts on ``threads`` threads of this process; ``dispatch`` (called every
    fraction of a second) claims only as many events as there are idle threads, so a
    claimed event never waits behind a slow one."""

    def __init__(self, outbox: WebhookOutbox, sender: WebhookSender, threads: int) -> None:
        self.outbox = outbox
        self.sender = sender
        self.threads = threads
        self.lease_seconds = sender.cfg.webhook_timeout_seconds + LEASE_MARGIN_SECONDS
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="morag-webhook")
        self._busy = 0
        self._lock = threading.Lock()

    def dispatch(self) -> int:
        """Start an attempt for up to one owed event per idle thread; returns how many."""
        with self._lock:
            idle = self.threads - self._busy
        entries = self.outbox.claim(idle, self.lease_seconds)
        for entry in entries:
            with self._lock:
                self._busy += 1
            self._pool.submit(self._attempt, entry)
        return len(entries)

    def _attempt(self, entry: OutboxEntry) -> None:
        try:
            result = self.sender.deliver(entry)
            self.outbox.settle(entry, result.retry_in, result.outcome)
        except Exception as exc:  # Redis away: the claim goes stale and is tried again
            logger.warning("webhook attempt failed", task_id=entry.task_id, error=str(exc))
        finally:
            with self._lock:
                self._busy -= 1

    def close(self) -> None:
        """Stop taking work; attempts under way finish (each within its timeout)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
