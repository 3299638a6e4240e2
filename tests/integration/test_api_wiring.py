"""How the API is put together: the fast paths answer exactly as the routes do, and an app
built from its own ``Settings`` and a worker started with the same ones share every key."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from morag.api.main import create_app
from morag.core.config import Settings
from morag.services.workers import WorkerRegistry
from tests.harness import wait_for

pytestmark = pytest.mark.usefixtures("isolated")

KEY = "fast-path-test-key"
ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class InProcess:
    """Requests to an app in this process, on one event loop (the app's asyncio Redis
    clients belong to the loop they were made in)."""

    def __init__(self, app: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        )

    def __call__(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.loop.run_until_complete(self.http.request(method, path, **kwargs))

    def close(self) -> None:
        self.loop.run_until_complete(self.http.aclose())
        self.loop.close()


def _comparable(response: httpx.Response) -> tuple[int, str, dict[str, str]]:
    """Status, body and the headers that matter, with job ids made alike (each app
    creates its own job for a submission)."""
    headers = {
        name: ID_PATTERN.sub("<id>", response.headers[name])
        for name in ("content-type", "location", "idempotent-replayed")
        if name in response.headers
    }
    return response.status_code, ID_PATTERN.sub("<id>", response.text), headers


def _own(kwargs: dict[str, Any], app_name: str) -> dict[str, Any]:
    """The request with its https URL (and Idempotency-Key) made the app's own: the same
    URL twice would be answered as a duplicate of the first app's job."""
    url = (kwargs.get("json") or {}).get("url", "")
    if not url.startswith("https://"):
        return kwargs
    own = {**kwargs, "json": {**kwargs["json"], "url": f"{url}?via={app_name}"}}
    if "Idempotency-Key" in kwargs.get("headers", {}):  # a key names one request: one per app
        own["headers"] = {**kwargs["headers"], "Idempotency-Key": f"k-{app_name}"}
    return own


def test_fast_paths_answer_as_the_routes_do() -> None:
    cfg = Settings(api_keys=[KEY])
    fast, routed = InProcess(create_app(cfg)), InProcess(create_app(cfg, fast_paths=False))
    good = {"Authorization": f"Bearer {KEY}"}
    queued = fast("POST", "/api/v1/ingest/url", headers=good, json={"url": "https://example.com/a"})
    assert queued.status_code == 202, queued.text
    known = queued.json()["task_id"]
    hooked = fast(
        "POST",
        "/api/v1/ingest/url",
        headers=good,
        json={"url": "https://example.com/w", "webhook_url": "https://hooks.test/in?token=s3"},
    ).json()["task_id"]

    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/api/v1/status/{known}", {"headers": good}),
        ("GET", f"/api/v1/status/{known}", {"headers": {"X-API-Key": KEY}}),
        ("GET", f"/api/v1/status/{known}", {}),
        ("GET", f"/api/v1/status/{known}", {"headers": {"Authorization": "Bearer wrong"}}),
        ("GET", "/api/v1/status/00000000-0000-0000-0000-000000000000", {"headers": good}),
        ("GET", "/api/v1/status/" + "x" * 201, {"headers": good}),
        ("POST", "/api/v1/ingest/url", {"headers": good, "json": {"url": "https://example.com/b"}}),
        (
            "POST",
            "/api/v1/ingest/url",
            {"headers": good, "json": {"url": "https://example.com/c", "source_type": "audio"}},
        ),
        ("POST", "/api/v1/ingest/url", {"json": {"url": "https://example.com/d"}}),
        ("POST", "/api/v1/ingest/url", {"headers": good, "json": {"url": "http://10.0.0.1/"}}),
        ("POST", "/api/v1/ingest/url", {"headers": good, "json": {"url": "ftp://example.com/"}}),
        ("POST", "/api/v1/ingest/url", {"headers": good, "json": {"nothing": 1}}),
        (
            "POST",
            "/api/v1/ingest/url",
            {"headers": {**good, "Content-Type": "application/json"}, "content": b"{not json"},
        ),
        (
            "POST",
            "/api/v1/ingest/url",
            {
                "headers": {**good, "Content-Type": "application/json"},
                "content": b'{"url": "https://example.com/f",\n "source_type" "web"}',
            },
        ),
        (
            "POST",
            "/api/v1/ingest/url",
            {"headers": {**good, "Content-Type": "application/json"}, "content": b"[" * 100_000},
        ),
        ("GET", f"/api/v1/status/{hooked}", {"headers": good}),
        (
            "POST",
            "/api/v1/ingest/url",
            {
                "headers": {**good, "Idempotency-Key": "k1"},
                "json": {"url": "https://example.com/e"},
            },
        ),
    ]
    try:
        for method, path, kwargs in requests:
            assert _comparable(fast(method, path, **_own(kwargs, "fast"))) == _comparable(
                routed(method, path, **_own(kwargs, "routed"))
            ), (method, path, kwargs)
    finally:
        fast.close()
        routed.close()


def test_an_app_and_a_worker_with_their_own_settings_share_their_keys(
    workers, redis_client, namespace: str
) -> None:
    """The record, the dedupe key and the message all go under the app's own prefix and
    broker namespace, where a worker started with the same settings finds them."""
    own = f"{namespace}-tenant-b"
    cfg = Settings(key_prefix=own, broker_namespace=f"{own}:")
    app = InProcess(create_app(cfg))
    worker = workers.start(key_prefix=own, broker_namespace=f"{own}:", wait=False)
    registry = WorkerRegistry(redis_client, own)
    wait_for(lambda: registry.live_workers() or not worker.alive(), 30, "the worker")
    assert worker.alive(), worker.log()

    answer = app(
        "POST",
        "/api/v1/ingest/file",
        files={"file": ("notes.md", b"# Notes\n\nShared keys.\n", "text/markdown")},
    )
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["task_id"]

    def finished() -> str | None:
        status = app("GET", f"/api/v1/status/{task_id}").json()["status"]
        return status if status in ("success", "failure") else None

    assert wait_for(finished, 60, "the job submitted through the app") == "success"
    assert redis_client.exists(f"{own}:job:{task_id}")
    assert not redis_client.exists(f"{namespace}:job:{task_id}")
    assert list(redis_client.scan_iter(match=f"{own}:dedupe:*"))
    assert not list(redis_client.scan_iter(match=f"{namespace}:dedupe:*"))
    result = app("GET", f"/api/v1/status/{task_id}/result").json()
    assert "Shared keys." in result["markdown"]
    app.close()


def test_the_fast_paths_refuse_to_skip_a_router_dependency(tmp_path: Path) -> None:
    from fastapi import Depends

    from morag.api.routes import status

    async def tenant_scope() -> None:
        return None

    status.router.dependencies.append(Depends(tenant_scope))
    try:
        with pytest.raises(RuntimeError, match="would skip them"):
            create_app(Settings())
    finally:
        status.router.dependencies.pop()
