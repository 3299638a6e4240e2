"""GET /metrics: counters made by the job scripts, gauges read from Redis, HTTP requests by
route template; all against a real Redis and a real worker."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from morag.api.main import create_app
from morag.core.config import Settings
from morag.core.keys import RedisKeys
from morag.core.redis_conn import get_redis
from morag.services.jobs import JobStore, TaskStatus, get_job_store, utcnow
from morag.services.webhooks import WebhookOutbox
from morag.tasks.system_tasks import probe
from tests.harness import wait_for


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def client(isolated: None) -> Iterator[TestClient]:
    with TestClient(create_app(Settings()), base_url="http://127.0.0.1") as test_client:
        yield test_client


def scrape(client: TestClient, **headers: str) -> str:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def test_requests_are_labelled_by_route_template_never_by_id(client: TestClient) -> None:
    ids = [str(uuid.uuid4()) for _ in range(40)]
    for task_id in ids:
        client.get(f"/api/v1/status/{task_id}")  # the fast path's route (404: no record)
        client.get(f"/api/v1/status/{task_id}/history")
        client.get(f"/no/such/{task_id}")
    text = scrape(client)
    assert not any(task_id in text for task_id in ids)
    series = {labels for (name, labels) in samples(text) if name.startswith("morag_http_request")}
    routes = {dict(labels)["route"] for labels in series}
    assert {"/api/v1/status/{task_id}", "/api/v1/status/{task_id}/history", "unmatched"} <= routes
    # 120 requests on 120 paths: a handful of series (requests per status, buckets per route)
    assert len(series) < 60, sorted(series)
    status_reads = value(
        text,
        "morag_http_requests_total",
        method="GET",
        route="/api/v1/status/{task_id}",
        status="404",
    )
    assert status_reads == 40
    count = value(
        text,
        "morag_http_request_duration_seconds_count",
        method="GET",
        route="/api/v1/status/{task_id}/history",
    )
    assert count == 40


def test_job_counters_and_histograms_move_as_jobs_run(client: TestClient, workers) -> None:
    workers.start(queues="celery", concurrency=1)
    store = get_job_store(Settings())
    ok = [probe.delay(steps=2, step_seconds=0.05).id for _ in range(2)]
    failed = probe.delay(fault="error").id
    for task_id in [*ok, failed]:
        wait_for(
            lambda t=task_id: (info := store.get(t)) is not None and info.status.is_final,
            30,
            f"job {task_id} to end",
        )
    text = scrape(client)
    assert value(text, "morag_jobs_submitted_total", kind="system", owner="anonymous") == 3
    assert value(text, "morag_jobs_finished_total", kind="system", state="success") == 2
    assert value(text, "morag_jobs_finished_total", kind="system", state="failure") == 1
    assert value(text, "morag_job_queue_wait_seconds_count", kind="system") == 3
    assert value(text, "morag_job_duration_seconds_count", kind="system", state="success") == 2
    assert value(text, "morag_job_duration_seconds_sum", kind="system", state="success") >= 0.1
    probing = value(text, "morag_job_stage_duration_seconds_count", kind="system", stage="probing")
    assert probing == 2
    assert value(text, "morag_workers") == 1
    assert value(text, "morag_queue_consumers", queue="celery") == 1
    assert value(text, "morag_queue_consumers", queue="audio_processing") == 0
    assert value(text, "morag_worker_starts_total") == 1


def test_queue_gauges_count_pending_running_and_reserved(client: TestClient, workers) -> None:
    store = get_job_store(Settings())
    text = scrape(client)
    assert value(text, "morag_queue_pending", queue="celery") == 0
    queued = [probe.delay().id for _ in range(3)]
    queued.append(probe.apply_async(priority=9).id)  # a priority sub-queue
    text = scrape(client)
    assert value(text, "morag_queue_pending", queue="celery") == 4
    assert value(text, "morag_queue_consumers", queue="celery") == 0
    workers.start(queues="celery", concurrency=1)
    for task_id in queued:
        wait_for(lambda t=task_id: store.get(t).status.is_final, 30, "the queued jobs to run")
    # One pool process runs a long job; the job behind it waits (on the queue or prefetched)
    long_job = probe.delay(steps=200, step_seconds=0.1).id
    wait_for(lambda: store.get(long_job).status is TaskStatus.PROGRESS, 30, "the long job")
    behind = probe.delay().id

    def running() -> str | None:
        text = scrape(client)
        return text if value(text, "morag_queue_running", queue="celery") == 1 else None

    text = wait_for(running, 10, "the running gauge")
    waiting = value(text, "morag_queue_pending", queue="celery") + value(
        text, "morag_queue_reserved", queue="celery"
    )
    assert waiting == 1
    assert value(text, "morag_queue_consumer_processes", queue="celery") == 1
    store.request_cancel(long_job)
    store.request_cancel(behind)


def test_recovery_and_webhook_counters(isolated: None, client: TestClient) -> None:
    cfg = Settings()
    store = JobStore(get_redis(cfg.redis_url), cfg.key_prefix, cfg.result_retention_seconds)
    store.create("crashy", kind="system", queue="celery", task_name="probe")
    assert store.start("crashy", worker="a", lease_seconds=30, max_attempts=2).outcome == "ok"
    get_redis(cfg.redis_url).delete(store.keys.lease("crashy"))  # its process died
    assert store.start("crashy", worker="b", lease_seconds=30, max_attempts=2).outcome == "ok"
    get_redis(cfg.redis_url).delete(store.keys.lease("crashy"))
    assert store.start("crashy", worker="c", lease_seconds=30, max_attempts=2).outcome == (
        "exhausted"
    )
    outbox = WebhookOutbox(get_redis(cfg.redis_url), cfg.key_prefix)
    get_redis(cfg.redis_url).rpush(
        outbox.outbox_key, '{"task_id": "x", "state": "success", "ts": ""}'
    )
    [entry] = outbox.claim(1, lease_seconds=30)
    assert outbox.settle(entry, retry_in=0.1, outcome="retrying")
    assert not outbox.settle(entry, outcome="delivered")  # a stale claim counts nothing
    text = scrape(client)
    assert value(text, "morag_recovery_actions_total", action="redelivered") == 1
    assert value(text, "morag_recovery_actions_total", action="gave_up") == 1
    assert value(text, "morag_jobs_finished_total", kind="system", state="failure") == 1
    assert value(text, "morag_webhook_deliveries_total", outcome="retrying") == 1
    assert value(text, "morag_webhook_deliveries_total", outcome="delivered") == 0
    assert value(text, "morag_webhook_backlog", state="scheduled") == 1


def test_a_queued_job_cancelled_counts_as_revoked_with_no_duration(
    isolated: None, client: TestClient
) -> None:
    cfg = Settings()
    store = get_job_store(cfg)
    store.create("never-ran", kind="document", queue="document_processing", task_name="x")
    assert store.request_cancel("never-ran").outcome == "revoked"
    text = scrape(client)
    assert value(text, "morag_jobs_finished_total", kind="document", state="revoked") == 1
    assert value(text, "morag_job_duration_seconds_count", kind="document", state="revoked") == 0
    assert utcnow() - store.get("never-ran").created_at < timedelta(minutes=1)


def test_metrics_are_protected_like_the_api(isolated: None) -> None:
    keys = {"api_keys": ["team:team-key-1"], "admin_keys": ["ops:ops-key-1"]}
    app = create_app(Settings(**keys))
    with TestClient(app, base_url="http://127.0.0.1") as keyed:
        assert keyed.get("/metrics").status_code == 401
        assert keyed.get("/metrics", headers={"X-API-Key": "wrong-key"}).status_code == 401
        # A team's key reads its own jobs, not the deployment's figures.
        assert keyed.get("/metrics", headers={"X-API-Key": "team-key-1"}).status_code == 401
        admin = keyed.get("/metrics", headers={"Authorization": "Bearer ops-key-1"})
        assert admin.status_code == 200
    split_app = create_app(Settings(**keys, metrics_key="metrics-key-1"))
    with TestClient(split_app, base_url="http://127.0.0.1") as split:
        assert split.get("/metrics", headers={"X-API-Key": "team-key-1"}).status_code == 401
        refused = split.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        scraper = split.get("/metrics", headers={"Authorization": "Bearer metrics-key-1"})
        assert scraper.status_code == 200
        assert split.get("/metrics", headers={"X-API-Key": "ops-key-1"}).status_code == 200
    with TestClient(
        create_app(Settings(metrics_key="metrics-key-1")), base_url="http://127.0.0.1"
    ) as local:
        assert local.get("/metrics").status_code == 401  # a metrics key protects it keyless too
        assert local.get("/metrics", headers={"X-API-Key": "metrics-key-1"}).status_code == 200
    with TestClient(create_app(Settings()), base_url="http://127.0.0.1") as open_:
        assert open_.get("/metrics").status_code == 200  # local single-user mode


def test_the_lifespan_runs_the_request_count_flushes(isolated: None) -> None:
    """Started with the app, before any request; counts reach Redis without a scrape;
    ended with the app, the last counts flushed."""
    app = create_app(Settings())
    http_metrics = app.state.http_metrics
    counts = get_redis(Settings().redis_url)
    key = RedisKeys(Settings().key_prefix).http_metrics

    def health_reads() -> int:
        return int(counts.hget(key, "c|GET|/health|200") or 0)

    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert http_metrics.flushing
        assert client.get("/health").status_code == 200
        wait_for(lambda: health_reads() == 1, 5, "the flush loop to add the request")
        assert client.get("/health").status_code == 200
    assert not http_metrics.flushing
    assert health_reads() == 2  # flushed once more on the way out


def test_an_app_served_without_its_lifespan_leaves_no_task_pending(
    isolated: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop that only serves requests (no lifespan, as a bare ASGI client) is closed
    with nothing of the metrics left on it; a scrape still flushes the counts."""
    app = create_app(Settings())
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")
    try:
        assert loop.run_until_complete(client.get("/health")).status_code == 200
        text = loop.run_until_complete(client.get("/metrics")).text
        health = value(
            text, "morag_http_requests_total", method="GET", route="/health", status="200"
        )
        assert health == 1
        assert not app.state.http_metrics.flushing
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(app.state.ingestion.aclose())
    finally:
        loop.close()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del app, client, loop
        gc.collect()
    assert not [r for r in caplog.records if "destroyed but it is pending" in r.getMessage()]
