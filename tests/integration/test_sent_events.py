"""Producers' task-sent events (core/sent_events.py) against a real Redis: batched, yet
every event reaches a Celery event receiver once, also from a process that exits at once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from morag.core.celery_app import celery_app
from tests.harness import ROOT, wait_for

pytestmark = pytest.mark.usefixtures("isolated")

#: A queue no worker consumes: the messages only wait there (the namespace is flushed).
HOLD = "sent-events-test-hold"


class Monitor:
    """A Celery event receiver on its own thread, as Flower and ``celery events`` run."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.messages = 0  # carrying task-sent events
        self._ready = threading.Event()
        self._token = uuid.uuid4().hex

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("token") == self._token:
            self._ready.set()
        elif event["type"] == "task-sent":
            self.sent[event["uuid"]] += 1

    def run(self) -> Iterator[Monitor]:
        with celery_app.connection_for_read() as connection:
            receiver = celery_app.events.Receiver(connection, handlers={"*": self._on_event})
            unpack = receiver._receive

            def count_messages(body: Any, message: Any) -> None:
                events = body if isinstance(body, list) else [body]
                self.messages += any(e.get("type") == "task-sent" for e in events)
                unpack(body, message)

            receiver._receive = count_messages  # what capture's consumer calls per message
            capture = threading.Thread(
                target=receiver.capture, kwargs={"wakeup": False}, daemon=True
            )
            capture.start()
            try:
                # Subscribed once one of our own pings comes back: no event can be missed.
                with celery_app.events.default_dispatcher() as dispatcher:

                    def ping() -> bool:
                        dispatcher.send("worker-ping", token=self._token)
                        return self._ready.wait(0.1)

                    wait_for(ping, 20, "the monitor's subscription")
                yield self
            finally:
                receiver.should_stop = True
                capture.join(10)


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    yield from Monitor().run()


def test_events_of_concurrent_producers_arrive_once_in_batches(monitor: Monitor) -> None:
    from morag.tasks.system_tasks import probe

    ids: list[str] = []

    def produce() -> None:
        for _ in range(50):
            ids.append(probe.apply_async(kwargs={"steps": 1}, queue=HOLD).id)

    threads = [threading.Thread(target=produce) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: len(monitor.sent) == 200, 20, "200 task-sent events")
    assert set(monitor.sent) == set(ids)
    assert set(monitor.sent.values()) == {1}, "each event once"
    assert monitor.messages < 100, "events travel in batches, not one message each"


def test_a_producer_that_exits_at_once_still_sends_its_events(monitor: Monitor) -> None:
    script = (
        "from morag.tasks.system_tasks import probe\n"
        f"print(' '.join(probe.apply_async(queue={HOLD!r}).id for _ in range(3)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 3
    wait_for(lambda: all(monitor.sent[i] == 1 for i in ids), 20, "the exited producer's events")


def test_a_submission_joining_identical_work_sends_no_message_and_no_event(
    monitor: Monitor, redis_client: Any
) -> None:
    """The API's publisher writes the record and the message in one call (core/broker.py):
    identical work already queued is joined, and then neither a message nor a task-sent
    event goes out for the new id."""
    from morag.core.config import settings
    from morag.services.ingestion.publisher import JobPublisher
    from morag.services.jobs import get_job_store
    from morag.tasks.system_tasks import probe

    store = get_job_store(settings)
    publisher = JobPublisher(store, celery_app)
    dedupe = store.keys.dedupe("anonymous", uuid.uuid4().hex)

    def submit(task_id: str) -> str:
        return publisher.send(
            probe.name, kind="system", kwargs={}, task_id=task_id, dedupe_key=dedupe, queue=HOLD
        )

    first, second, other = (str(uuid.uuid4()) for _ in range(3))
    assert submit(first) == first
    assert submit(second) == first  # joined: that job does the work
    assert publisher.send(probe.name, kind="system", kwargs={}, task_id=other, queue=HOLD) == other
    wait_for(lambda: other in monitor.sent, 20, "the last submission's task-sent event")
    assert dict(monitor.sent) == {first: 1, other: 1}
    queued = redis_client.lrange(f"{settings.key_prefix}:{HOLD}", 0, -1)
    assert sorted(json.loads(m)["headers"]["id"] for m in queued) == sorted([first, other])
    assert store.get(second) is None
