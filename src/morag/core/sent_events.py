"""Task-sent events of producers (the API, ``apply_async`` callers), published in batches.

The seed keeps ``task_send_sent_event`` on, so monitors (Flower, ``celery events``) see a
job from its submission. Celery publishes that event on its own, one Redis PUBLISH per
job, a large part of a producer's CPU per submission. Producers hand
it to ``SentEventBatcher`` instead, which publishes what gathered every
``EVENT_FLUSH_SECONDS`` as one ``task.multi`` message, the form Celery's workers use for
their own batches and every event receiver unpacks. Events are a live feed, not morag's
record (that is the job record), so they may be a tenth of a second late; when Redis is
unreachable a batch is dropped with a warning rather than held without bound.

Pending events are published when the process exits normally (``atexit``) and when a
pool process is recycled (``flush``, from tasks/lifecycle.py).
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

import structlog
from celery import Celery
from celery.events.event import Event, get_exchange
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset

from morag.core.broker import recorded_publish

logger = structlog.get_logger(__name__)

#: How late a task event may reach monitors (the worker's batches use it too).
EVENT_FLUSH_SECONDS = 0.1
#: A batch this large goes out at once, without waiting for the timer.
BATCH_LIMIT = 200


class SentEventBatcher:
    """Takes the place of Celery's sent-event dispatcher (``send_task_message``'s
    ``event_dispatcher``): ``publish`` buffers, a daemon thread sends the batches."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.hostname = anon_nodename()
        self._exchange: Any = None
        self._reset()

    def _reset(self) -> None:
        """Fresh state for this process (a forked child inherits none of the parent's)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **_: Any) -> None:
        """Buffer one event (Celery's dispatcher signature; the producer is not needed)."""
        pending = recorded_publish.get()
        if pending is not None and pending.joined and fields.get("uuid") == pending.task_id:
            return  # identical work was active: no message was sent (core/broker.py)
        if self._pid != os.getpid():
            self._reset()
        event = Event(
            type,
            hostname=self.hostname,
            utcoffset=utcoffset(),
            pid=self._pid,
            clock=self.app.clock.forward(),
            **fields,
        )
        with self._lock:
            self._pending.append(event)
            full = len(self._pending) >= BATCH_LIMIT
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="morag-sent-events", daemon=True
                )
                self._thread.start()
        if full:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(EVENT_FLUSH_SECONDS)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Publish what is pending now (one message); never raises."""
        if self._pid != os.getpid():
            return  # the events of a parent process are not this process's to send
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            with self.app.producer_or_acquire() as producer:
                if self._exchange is None:
                    self._exchange = get_exchange(
                        producer.connection, name=self.app.conf.event_exchange
                    )
                producer.publish(
                    batch,
                    routing_key="task.multi",
                    exchange=self._exchange.name,
                    declare=[self._exchange],
                    serializer=self.app.conf.event_serializer,
                    headers={"hostname": self.hostname},
                    delivery_mode=1,  # transient, as Celery's own events
                )
        except Exception as exc:  # a monitor feed: never worth failing or blocking a producer
            logger.warning("task-sent events dropped", count=len(batch), error=str(exc))


_batchers: dict[int, SentEventBatcher] = {}
_batchers_lock = threading.Lock()


def sent_event_batcher(app: Celery) -> SentEventBatcher:
    """The batcher of ``app`` (one per app and process; flushed at exit)."""
    with _batchers_lock:
        batcher = _batchers.get(id(app))
        if batcher is None:
            batcher = _batchers[id(app)] = SentEventBatcher(app)
            atexit.register(batcher.flush)
        return batcher
