"""The service as processes: health over HTTP, Celery's own tools and Flower seeing the
workers, and ``morag up`` starting and stopping everything with an embedded Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from morag.core.config import ALL_QUEUES
from tests.harness import ROOT, free_port, start_api, wait_for


def test_liveness_is_fast(api_server: str) -> None:
    started = time.monotonic()
    response = httpx.get(f"{api_server}/health")
    assert response.status_code == 200 and response.json() == {"status": "alive"}
    assert time.monotonic() - started < 0.5


def test_readiness_names_queues_without_consumers(api_server: str, workers) -> None:
    started = time.monotonic()
    response = httpx.get(f"{api_server}/health/ready")
    assert time.monotonic() - started < 1.0  # no worker answers, yet no remote-control wait
    assert response.status_code == 503
    body = response.json()
    assert body["services"]["redis"] == "healthy"
    assert sorted(body["queues_without_consumers"]) == sorted(ALL_QUEUES)

    workers.start(queues="document_processing")
    body = httpx.get(f"{api_server}/health/ready").json()
    assert sorted(body["queues_without_consumers"]) == sorted(
        q for q in ALL_QUEUES if q != "document_processing"
    )

    workers.start(queues="audio_processing,video_processing,web_processing,celery")
    started = time.monotonic()
    response = httpx.get(f"{api_server}/health/ready")
    assert time.monotonic() - started < 1.0
    assert response.status_code == 200, response.text
    assert response.json()["queues_without_consumers"] == []


def celery_command(*args: str, timeout: float = 30) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "morag.core.celery_app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=os.environ,
        check=False,
    )
    return result.stdout + result.stderr


def test_celery_inspect_sees_the_workers_and_their_queues(workers) -> None:
    worker = workers.start(queues="document_processing,celery")
    name = worker.log_path.stem
    output = celery_command("inspect", "active_queues", "--timeout=5")
    assert f"{name}-" in output or name in output, output
    assert "document_processing" in output and "audio_processing" not in output


def test_task_events_reach_a_monitor(workers) -> None:
    """Workers publish task events in batches (tasks/lifecycle.py), yet every one arrives
    once, as `celery events` and Flower see them."""
    from morag.core.celery_app import celery_app
    from morag.tasks.system_tasks import probe

    seen: dict[str, list[str]] = defaultdict(list)
    heartbeats = threading.Event()

    def on_event(event: dict) -> None:
        if event["type"] == "worker-heartbeat":
            heartbeats.set()
        elif event.get("uuid"):
            seen[event["uuid"]].append(event["type"])

    with celery_app.connection_for_read() as connection:
        receiver = celery_app.events.Receiver(connection, handlers={"*": on_event})
        capture = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        capture.start()
        try:
            workers.start(queues="celery", concurrency=2)
            # a heartbeat seen means the receiver is subscribed: no task event can be missed
            wait_for(heartbeats.is_set, 30, "the worker's first heartbeat")
            ids = [probe.delay(steps=1).id for _ in range(10)]
            # sent by this process, the others by the worker
            expected = ["task-received", "task-sent", "task-started", "task-succeeded"]
            wait_for(lambda: all(sorted(seen[i]) == expected for i in ids), 30, "every task event")
        finally:
            receiver.should_stop = True
            capture.join(10)


def test_flower_sees_the_workers(workers, tmp_path: Path) -> None:
    workers.start(queues="web_processing")
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "morag.core.celery_app",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def workers_seen() -> dict | None:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=5)
            except httpx.HTTPError:
                return None
            return reply.json() if reply.status_code == 200 and reply.json() else None

        seen = wait_for(workers_seen, 60, "Flower to list the worker", interval=0.5)
        ((worker_name, info),) = seen.items()
        assert worker_name.startswith("w0-")
        assert [q["name"] for q in info["active_queues"]] == ["web_processing"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(15)
        log.close()


@pytest.mark.timeout(120)
def test_morag_up_starts_everything_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MORAG_REDIS_URL"}  # embedded Redis
    env["MORAG_DATA_DIR"] = str(tmp_path / "data")
    up = subprocess.Popen(
        [sys.executable, "-m", "morag.cli", "up", "--port", str(port), "--concurrency", "1"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 60, "morag up to be ready", interval=0.2)
        assert (tmp_path / "data" / "redis" / "appendonly.aof").exists() or any(
            (tmp_path / "data" / "redis").glob("appendonly*")
        )
        body = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).json()
        assert body["services"] == {"redis": "healthy", "celery": "healthy"}
        assert body["workers"] and body["reasons"] == {}
        _ingest_one_document(f"http://127.0.0.1:{port}")
        _assert_private(tmp_path / "data")
        descendants = subprocess.run(
            ["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True
        ).stdout.split()
        assert descendants, "the embedded redis-server runs with the data dir"
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    text = output.decode(errors="replace")
    assert up.returncode == 0, text
    assert "embedded Redis" in text and "morag: stopped" in text
    left = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "data")], capture_output=True, text=True
    ).stdout.split()
    assert left == [], "nothing keeps running after Ctrl-C"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


def _ingest_one_document(base: str) -> None:
    """Upload a small Markdown file and wait for its job to succeed."""
    answer = httpx.post(
        f"{base}/api/v1/ingest/file",
        files={"file": ("notes.md", b"# Notes\n\nA private note.\n", "text/markdown")},
    )
    assert answer.status_code == 202, answer.text
    status_url = f"{base}/api/v1/status/{answer.json()['task_id']}"
    wait_for(lambda: httpx.get(status_url).json()["status"] == "success", 60, "the upload's job")


def _assert_private(data_dir: Path) -> None:
    """Nothing under the data dir is open to the group or others: directories are 0700,
    files (uploads, the AOF and RDB files, Redis's log) 0600."""
    entries = [data_dir, *data_dir.rglob("*")]
    assert any(p.is_file() and p.parent.name == "redis" for p in entries)
    assert any(p.name.startswith("appendonly") for p in entries)
    modes = {str(p.relative_to(data_dir.parent)): p.lstat().st_mode & 0o777 for p in entries}
    for path, mode in modes.items():
        if (data_dir.parent / path).is_socket():
            assert mode & 0o077 == 0, (path, oct(mode))
        elif (data_dir.parent / path).is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode == 0o600, (path, oct(mode))


def test_readiness_without_redis_says_unhealthy_and_no_more(tmp_path: Path) -> None:
    """The seed's contract: each service is exactly "healthy" or "unhealthy"; an answer
    that needs no key names no file path and quotes no exception."""
    socket_path = tmp_path / "no-redis-here.sock"
    base, server = start_api(tmp_path / "api.log", redis_url=f"unix://{socket_path}")
    try:
        response = httpx.get(f"{base}/health/ready", timeout=5)
    finally:
        server.stop()
    assert response.status_code == 503
    body = response.json()
    assert body["services"] == {"redis": "unhealthy", "celery": "unhealthy"}
    assert body["reasons"] == {"redis": "Redis is unreachable", "celery": "Redis is unreachable"}
    assert str(tmp_path) not in response.text and "Error" not in response.text
    assert str(socket_path) in server.log(), "the reason, with its path, is logged instead"


def test_a_submission_without_redis_is_refused_as_unavailable(tmp_path: Path) -> None:
    """With Redis away the record's write fails inside the publish (one call with the
    message, core/broker.py), where kombu wraps it: still 503 with Retry-After, not 500."""
    socket_path = tmp_path / "no-redis-here.sock"
    base, server = start_api(tmp_path / "api.log", redis_url=f"unix://{socket_path}")
    try:
        response = httpx.post(
            f"{base}/api/v1/ingest/url", json={"url": "https://example.org/a"}, timeout=30
        )
    finally:
        server.stop()
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    assert response.json()["error"]["code"] == "unavailable"
