"""The baseline: a minimal Celery app with the settings morag uses to protect work.

Same broker (the benchmark's Redis, over the same unix socket), same prefork pool and
concurrency, prefetch 1, ``acks_late``, reject on worker lost, JSON only. No job records,
no progress, no morag code. Results are on or off (``results``): on, the Redis result
backend stores every result, as a Celery user who reads outcomes runs it; off,
``ignore_result``. Task events stay at Celery's default (off).

A worker is started with ``celery -A bench.bare_app worker`` and configured by the
``BENCH_BARE_*`` environment variables; the benchmark process builds the same app
with ``make_app``.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from kombu import Queue


def make_app(broker_url: str, namespace: str, results: bool) -> Celery:
    app = Celery("bench_bare")
    transport = {"global_keyprefix": namespace} if namespace else {}
    app.conf.update(
        broker_url=broker_url,
        result_backend=broker_url,
        broker_transport_options=dict(transport),
        result_backend_transport_options=dict(transport),
        broker_connection_retry_on_startup=True,
        task_queues=(Queue("celery", routing_key="celery"),),
        task_default_queue="celery",
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=not results,
        result_expires=3600,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        """Nothing: the cost measured is Celery's own."""
        return None

    @app.task(name="bench.sleep", shared=False)
    def sleep(seconds: float) -> None:
        """A job that runs for a while (the crash-recovery baseline)."""
        time.sleep(seconds)

    return app


app = make_app(
    os.environ.get("BENCH_BARE_BROKER_URL", "redis://127.0.0.1:6379/15"),
    os.environ.get("BENCH_BARE_NAMESPACE", "bench-bare:"),
    os.environ.get("BENCH_BARE_RESULTS", "1") == "1",
)
