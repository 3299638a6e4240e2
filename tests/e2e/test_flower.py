"""Flower, started as the README says, against morag's broker: its queue lengths are the
pending counts morag reports, over TCP and over the embedded Redis's unix socket."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from morag.core.config import ALL_QUEUES
from morag.core.embedded_redis import EmbeddedRedis
from tests.e2e.conftest import ApiFactory
from tests.harness import ServiceProcess, free_port, wait_for

pytestmark = pytest.mark.usefixtures("isolated")

# Jobs per queue (none on video_processing and celery); no worker runs, so all stay pending.
SUBMITTED = {"document_processing": 3, "web_processing": 2, "audio_processing": 1}


@pytest.fixture(params=["session", "embedded"])
def redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The session's Redis (TCP unless none runs here), or an embedded one on a unix socket
    as ``morag up`` starts it. Requested before the processes, so it stops after them."""
    if request.param == "session":
        yield os.environ["MORAG_REDIS_URL"]
        return
    server = EmbeddedRedis(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()


def start_flower(redis_url: str, log_path: Path) -> tuple[ServiceProcess, str]:
    port = free_port()
    env = {
        **os.environ,
        "MORAG_REDIS_URL": redis_url,
        "FLOWER_UNAUTHENTICATED_API": "true",  # Flower 2 serves /api only with auth or this
    }
    args = ["-A", "morag.core.celery_app", "flower", f"--port={port}", "--address=127.0.0.1"]
    flower = ServiceProcess(args, env, log_path, module="celery")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/healthcheck", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return not flower.alive()

    wait_for(up, 30, "Flower to answer")
    assert flower.alive(), flower.log()
    return flower, base


def submit(client: httpx.Client, queue: str, n: int) -> None:
    if queue == "document_processing":
        files = {"file": (f"notes-{n}.md", f"# Notes {n}\n\nText.\n".encode())}
        response = client.post("/api/v1/ingest/file", files=files)
    else:
        kind = queue.removesuffix("_processing")  # never fetched: no worker runs
        body = {"url": f"http://127.0.0.1:9/{kind}-{n}", "source_type": kind}
        response = client.post("/api/v1/ingest/url", json=body)
    assert response.status_code == 202, response.text


def test_flower_queue_lengths_are_the_pending_counts(
    redis_url: str, api_factory: ApiFactory, tmp_path: Path
) -> None:
    api = api_factory.start(redis_url=redis_url)
    with httpx.Client(base_url=api.url, timeout=10) as client:
        for queue, count in SUBMITTED.items():
            for n in range(count):
                submit(client, queue, n)
        stats = client.get("/api/v1/status/stats/queues").json()
    pending = {queue: info["pending"] for queue, info in stats["queues"].items()}
    assert pending == {q: SUBMITTED.get(q, 0) for q in ALL_QUEUES}, "no worker: all still queued"
    assert not stats["workers"]

    flower, base = start_flower(redis_url, tmp_path / "flower.log")
    try:
        response = httpx.get(f"{base}/api/queues/length", timeout=10)
        assert response.status_code == 200, (response.text, flower.log())
        # With no worker up, Flower lists the app's configured queues.
        lengths = {q["name"]: q["messages"] for q in response.json()["active_queues"]}
        assert lengths == pending
    finally:
        flower.stop()
    assert not flower.alive()
