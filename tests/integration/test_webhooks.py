"""Webhooks against a real Redis, real workers and a receiver on 127.0.0.1.

No test sends a packet anywhere but 127.0.0.1: refused targets (10.0.0.1, or loopback
under a policy that refuses it) are stopped by the guard before any connection.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from standardwebhooks import Webhook

from morag.core.celery_app import celery_app
from morag.core.config import settings
from morag.core.redis_conn import get_redis
from morag.core.url_guard import UrlPolicy
from morag.services.ingestion.publisher import JobPublisher
from morag.services.jobs import TaskStatus, get_job_store
from morag.services.task_manager import task_manager
from morag.services.webhooks import OutboxEntry, WebhookOutbox, WebhookSender, message_id
from morag.tasks.system_tasks import probe
from tests.harness import wait_for
from tests.webhook_receiver import HANG, SECRET, Received, receivers

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def receiver() -> Iterator[Any]:
    with receivers() as make:
        yield make


@pytest.fixture
def signing(monkeypatch: pytest.MonkeyPatch) -> str:
    """The secret in this process too (in-process senders sign with it)."""
    monkeypatch.setattr(settings, "webhook_secret", SECRET)
    return SECRET


def submit(url: str, **kwargs: Any) -> str:
    publisher = JobPublisher(get_job_store(settings), celery_app)
    return publisher.send(probe.name, kind="system", kwargs=kwargs, extra={"webhook_url": url})


def webhook_events(task_id: str) -> list[dict[str, Any]]:
    return [e for e in get_job_store(settings).history(task_id) if e["stage"] == "webhook"]


def wait_webhook_outcome(task_id: str, outcome: str, timeout: float = 30) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        hits = [e for e in webhook_events(task_id) if e.get("webhook_outcome") == outcome]
        return hits[-1] if hits else None

    return wait_for(found, timeout, f"webhook {outcome} for {task_id}")


def entry(task_id: str, state: str, attempt: int = 1) -> OutboxEntry:
    return OutboxEntry(task_id, state, ts="", attempt=attempt)


def verified(request: Received, secret: str = SECRET) -> dict[str, Any]:
    """The event, after checking its Standard Webhooks signature."""
    return Webhook(secret).verify(request.body, request.headers)


# --- the outbox: owed atomically by the final transition, dispatched without loss -------


def test_every_final_transition_owes_exactly_one_webhook() -> None:
    store = get_job_store(settings)
    outbox = store.redis

    def new(webhook: bool = True) -> str:
        task_id = str(uuid.uuid4())
        extra = {"webhook_url": "http://127.0.0.1:9/hook"} if webhook else None
        store.create(task_id, kind="system", queue="celery", task_name="t", extra=extra)
        return task_id

    def owed() -> list[tuple[str, str]]:
        entries = [json.loads(e) for e in outbox.lrange(store.keys.webhook_outbox, 0, -1)]
        return [(e["task_id"], e["state"]) for e in entries]

    claim = {"worker": "w", "lease_seconds": 30, "max_attempts": 3}
    done = new()
    store.start(done, **claim)
    store.finish(done, TaskStatus.SUCCESS, worker="w")
    store.finish(done, TaskStatus.FAILURE, worker="w")  # the first final state wins
    silent = new(webhook=False)
    store.start(silent, **claim)
    store.finish(silent, TaskStatus.SUCCESS, worker="w")
    queued = new()
    assert store.request_cancel(queued).outcome == "revoked"
    exhausted = new()
    assert store.start(exhausted, **{**claim, "max_attempts": 0}).outcome == "exhausted"
    running = new()  # cancel requested while running, its process died: the next start ends it
    store.start(running, **claim)
    assert store.request_cancel(running).outcome == "cancelling"
    store.redis.delete(store.keys.lease(running))
    assert store.start(running, **claim).outcome == "cancelled"

    assert owed() == [
        (done, "success"),
        (queued, "revoked"),
        (exhausted, "failure"),
        (running, "revoked"),
    ]
    entry = json.loads(outbox.lindex(store.keys.webhook_outbox, 0))
    assert entry["ts"] == store.get(done).finished_at.isoformat()


def test_claims_of_a_dead_process_and_due_retries_come_back() -> None:
    """Every owed event is in exactly one of outbox / in flight / scheduled, and moves on
    only through claim and settle (atomic scripts), so a crash anywhere loses nothing."""
    client = get_redis(settings.redis_url)
    outbox = WebhookOutbox(client, settings.key_prefix)
    for n in range(3):
        client.rpush(outbox.outbox_key, json.dumps({"task_id": f"t{n}", "state": "success"}))

    dead = outbox.claim(2, lease_seconds=0.3)  # claimed by a process that then died
    assert [e.task_id for e in dead] == ["t0", "t1"] and outbox.backlog() == (1, 2, 0)
    [live] = outbox.claim(5, lease_seconds=60)
    assert live.task_id == "t2" and live.attempt == 1
    assert outbox.settle(live, retry_in=0.3)  # attempt 1 failed: attempt 2 is scheduled
    assert outbox.backlog() == (0, 2, 1)

    # the dead claims go stale and the retry falls due: all three come back to a claimer
    back = wait_for(lambda: outbox.claim(5, lease_seconds=60) or None, 10, "stale claims")
    while len(back) < 3:
        back += wait_for(lambda: outbox.claim(5, lease_seconds=60) or None, 10, "the retry")
    assert sorted((e.task_id, e.attempt) for e in back) == [("t0", 1), ("t1", 1), ("t2", 2)]
    # a stale claim that finishes late changes nothing: its event was handed out again
    assert not outbox.settle(dead[0], retry_in=1.0)
    for entry in back:
        assert outbox.settle(entry)
    assert outbox.backlog() == (0, 0, 0)


# --- in-process sender: the guard refuses before connecting ------------------------------


def test_refused_targets_are_recorded_and_never_contacted(
    receiver, signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Should the guard fail, the connection to 10.0.0.1 is stopped here, not on the network.
    real_connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: Any) -> None:
        if not isinstance(address, str) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"a test tried to connect to {address}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    server = receiver()
    store = get_job_store(settings)
    private, loopback = "http://10.0.0.1/hook", server.url()
    ids = {}
    for name, url in (("private", private), ("loopback", loopback)):
        ids[name] = str(uuid.uuid4())
        store.create(
            ids[name], kind="system", queue="celery", task_name="t", extra={"webhook_url": url}
        )
        store.start(ids[name], worker="w", lease_seconds=30, max_attempts=3)
        store.finish(ids[name], TaskStatus.SUCCESS, worker="w")
    refusing = UrlPolicy()  # allows nothing local: loopback is refused like 10.0.0.1
    sender = WebhookSender(store, settings, policy=refusing)
    for name, reason in (("private", "private-use (RFC 1918)"), ("loopback", "loopback")):
        result = sender.deliver(entry(ids[name], "success"))
        assert result.outcome == "refused"
        [event] = webhook_events(ids[name])
        assert event["webhook_outcome"] == "refused" and reason in event["message"]
        assert event["state"] == "success" and event["delivery_attempt"] == 1
        # the delivery is over: a duplicate message changes nothing
        assert sender.deliver(entry(ids[name], "success")).outcome == "skipped"
    assert server.requests == []
    # the same loopback receiver, allowed by the test policy, does get the event
    allowed = WebhookSender(store, settings, policy=UrlPolicy(allow=("127.0.0.1",)))
    other = str(uuid.uuid4())
    store.create(
        other, kind="system", queue="celery", task_name="t", extra={"webhook_url": loopback}
    )
    store.request_cancel(other)
    assert allowed.deliver(entry(other, "revoked")).outcome == "delivered"
    assert verified(server.wait_requests(1)[0])["type"] == "job.cancelled"


# --- through workers --------------------------------------------------------------------


def test_succeeded_job_sends_a_signed_event(workers, receiver, signing) -> None:
    server = receiver()
    workers.start(queues="celery", webhook_secret=SECRET)
    task_id = submit(server.url(), steps=2, metadata={"source": "test"})
    [request] = server.wait_requests(1)
    event = verified(request)
    assert request.path == "/hook"
    assert request.headers["webhook-id"] == message_id(task_id, "success")
    assert event["type"] == "job.succeeded"
    data = event["data"]
    assert data["task_id"] == task_id and data["status"] == "success"
    assert data["result"]["steps"] == 2 and data["error"] is None
    assert data["metadata"] == {"source": "test"} and data["attempts"] == 1
    info = task_manager.get_task_status(task_id)
    assert event["timestamp"] == data["finished_at"] == info.finished_at.isoformat()
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()).verify(
            request.body, request.headers
        )
    delivered = wait_webhook_outcome(task_id, "delivered")
    assert delivered["message"] == "webhook delivered (200)"
    assert delivered["state"] == "success" and delivered["webhook_status"] == 200


def test_failed_delivery_is_retried_with_backoff_and_both_attempts_recorded(
    workers, receiver, signing
) -> None:
    backoff = 1.0
    server = receiver([500, 200])
    workers.start(queues="celery", webhook_secret=SECRET, webhook_backoff_seconds=str(backoff))
    task_id = submit(server.url())
    first, second = server.wait_requests(2, timeout=30)
    assert second.at - first.at >= backoff - 0.1
    assert verified(first) == verified(second)  # the same event, signed again
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    wait_webhook_outcome(task_id, "delivered")
    events = webhook_events(task_id)
    assert [(e["webhook_outcome"], e["delivery_attempt"]) for e in events] == [
        ("retrying", 1),
        ("delivered", 2),
    ]
    assert events[0]["message"] == f"webhook failed (HTTP 500), retry in {backoff:g} s"
    assert events[0]["webhook_status"] == 500 and events[1]["webhook_status"] == 200
    outbox = WebhookOutbox(get_redis(settings.redis_url), settings.key_prefix)
    assert outbox.backlog() == (0, 0, 0) and len(server.requests) == 2


def test_gives_up_after_the_last_attempt(workers, receiver) -> None:
    server = receiver([503, 503, 503])
    workers.start(queues="celery", webhook_backoff_seconds="0.1", webhook_max_attempts="3")
    task_id = submit(server.url())
    failed = wait_webhook_outcome(task_id, "failed")
    assert failed["message"] == "webhook failed (HTTP 503); gave up after 3 attempts"
    assert [e["delivery_attempt"] for e in webhook_events(task_id)] == [1, 2, 3]
    assert len(server.requests) == 3


def test_failed_and_cancelled_jobs_send_their_events(workers, receiver) -> None:
    server = receiver()
    workers.start(queues="celery", concurrency=1)  # no secret: sent unsigned
    failed = submit(server.url("/failed"), fault="error")
    [request] = server.wait_requests(1)
    event = json.loads(request.body)
    assert "webhook-signature" not in request.headers and request.headers["webhook-id"]
    assert event["type"] == "job.failed" and event["data"]["task_id"] == failed
    assert event["data"]["error"]["type"] == "ValueError"
    assert "injected error" in event["data"]["error"]["message"]

    running = submit(server.url("/cancelled"), steps=600, step_seconds=0.1)
    wait_for(
        lambda: task_manager.get_task_status(running).status is TaskStatus.PROGRESS,
        30,
        "the job to run",
    )
    task_manager.cancel(running)
    request = server.wait_requests(2)[1]
    event = json.loads(request.body)
    assert request.path == "/cancelled" and event["type"] == "job.cancelled"
    assert event["data"]["status"] == "revoked" and event["data"]["result"] is None


def test_hanging_receivers_do_not_block_jobs(workers, receiver) -> None:
    """Deliveries run on the worker's delivery threads, not in its job processes: with
    every delivery thread stuck on a receiver that never answers, jobs still flow."""
    timeout = 4.0
    hanging = [receiver([HANG]) for _ in range(3)]
    workers.start(
        queues="celery",
        concurrency=1,
        webhook_timeout_seconds=str(timeout),
        webhook_backoff_seconds="600",
        webhook_delivery_threads="2",
    )
    slow = [submit(server.url()) for server in hanging]
    wait_for(lambda: sum(len(s.requests) for s in hanging) >= 2, 30, "two hanging deliveries")
    hung_at = time.monotonic()
    waits = []
    for _ in range(5):  # one after another on the worker's single job process
        submitted = time.monotonic()
        job = probe.delay()
        info = wait_for(
            lambda job=job: (i := task_manager.get_task_status(job.id)).status.is_final and i,
            timeout,
            "a job while deliveries hang",
        )
        assert info.status is TaskStatus.SUCCESS
        waits.append(time.monotonic() - submitted)
    assert time.monotonic() - hung_at < timeout  # all of it while both threads were stuck
    assert max(waits) < 1.0, waits
    # each hang ends at the timeout; the third delivery got a thread then
    for task_id in slow:
        retrying = wait_webhook_outcome(task_id, "retrying", timeout=3 * timeout + 10)
        assert retrying["message"].startswith("webhook failed (timed out posting to")
        assert retrying["retry_in"] == 600 and retrying["webhook_status"] is None
