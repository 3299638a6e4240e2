"""Scenario 7: slow consumers. Webhook receivers that hang or answer 500, under load.

Jobs whose webhooks go to receivers that never answer (and others answering 500) finish
while normal jobs keep arriving at a steady rate on the same worker, and the API answers
meanwhile. Measured: latency of the normal jobs (submitted -> success) against the same
traffic without any webhook, the API's /health latency, and what the deliveries recorded.

The single-attempt case is tests/integration/test_webhooks.py (webhook developer's).

Quick: 4 hanging + 4 failing receivers, 24 normal jobs. Full (``-m slow``): 16 + 16, 200.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from morag.services.jobs import TaskStatus
from tests.reliability.support import audit, percentile, wait_all_final
from tests.webhook_receiver import HANG, receivers

WEBHOOK_TIMEOUT = 2.0


def _feed(submitter, count: int, into: list[str]) -> threading.Thread:
    def run() -> None:
        for _ in range(count):
            into.append(submitter.probe(steps=1, step_seconds=0.05))
            time.sleep(0.1)  # pacing of the load generator, not a wait for a condition

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _latencies(records, ids) -> list[float]:
    return [
        (records[i].finished_at - records[i].created_at).total_seconds()
        for i in ids
        if records[i] is not None and records[i].finished_at is not None
    ]


@pytest.mark.parametrize(
    ("slow", "normal"),
    [pytest.param(4, 24, id="quick"), pytest.param(16, 200, id="full", marks=pytest.mark.slow)],
)
def test_slow_webhook_receivers_do_not_block_jobs_or_the_api(
    workers, submitter, api_server, report, slow: int, normal: int
) -> None:
    worker = workers.start(
        queues="celery",
        concurrency=2,
        webhook_timeout_seconds=str(WEBHOOK_TIMEOUT),
        webhook_backoff_seconds="1",
        webhook_max_attempts="3",
    )
    # Baseline: the same normal traffic, no webhooks.
    baseline_ids: list[str] = []
    _feed(submitter, normal // 2, baseline_ids).join(120)
    baseline = _latencies(wait_all_final(submitter.store, baseline_ids, 60), baseline_ids)

    with receivers() as make:
        hanging = [make([HANG] * 10) for _ in range(slow)]
        failing = [make([500] * 10) for _ in range(slow)]
        hooked = [
            submitter.submit(kwargs={}, extra={"webhook_url": r.url()})
            for r in (*hanging, *failing)
        ]
        normal_ids: list[str] = []
        feeder = _feed(submitter, normal, normal_ids)
        health: list[float] = []
        while feeder.is_alive():
            asked = time.monotonic()
            assert httpx.get(f"{api_server}/health", timeout=5).status_code == 200
            health.append(time.monotonic() - asked)
            feeder.join(0.2)
        records = wait_all_final(submitter.store, normal_ids + hooked, timeout=120)
        posts = sum(len(r.requests) for r in (*hanging, *failing))

    latency = _latencies(records, normal_ids)
    tally = audit(f"slow-webhooks/{slow}+{slow}", submitter.store, normal_ids + hooked, records)
    figures = dict(
        webhook_timeout_s=WEBHOOK_TIMEOUT,
        webhook_posts_received=posts,
        normal_latency_baseline_p50_s=round(percentile(baseline, 0.5), 2),
        normal_latency_p50_s=round(percentile(latency, 0.5), 2),
        normal_latency_p95_s=round(percentile(latency, 0.95), 2),
        normal_latency_max_s=round(max(latency, default=0), 2),
        api_health_max_s=round(max(health, default=0), 3),
    )
    report.record(tally, **figures)
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert all(records[i].status is TaskStatus.SUCCESS for i in normal_ids + hooked)
    assert worker.alive()
    assert max(health) < 1.0, health
    assert posts >= len(hooked)  # every receiver was tried
    # Deliveries run on their own threads, not the job pool: no normal job waits longer
    # than one delivery attempt (plus slack), however many receivers hang.
    assert max(latency) < WEBHOOK_TIMEOUT + 2, figures
