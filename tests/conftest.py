"""Session set-up: a real Redis (local, or an embedded redis-server), a namespace of
keys of this session's own, and factories for real worker and API processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.harness import (
    ServiceProcess,
    drop_index_database,
    empty_index,
    find_index,
    find_redis,
    flush_namespace,
    start_api,
    test_environment,
    wait_for,
)

_session: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module imports morag: its settings come from these variables.
    url, embedded = find_redis()
    namespace = f"morag-test-{uuid.uuid4().hex[:8]}"
    index_url, embedded_index = find_index(namespace)
    data_dir = Path(tempfile.mkdtemp(prefix="morag-test-data-"))
    env = test_environment(url, namespace, data_dir, index_url)
    os.environ.update(env)
    (data_dir / "uploads").mkdir(parents=True, exist_ok=True)
    _session.update(
        url=url,
        embedded=embedded,
        namespace=namespace,
        data_dir=data_dir,
        env=env,
        index_url=index_url,
        embedded_index=embedded_index,
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _session.get("url"):
        flush_namespace(redis.Redis.from_url(str(_session["url"])), str(_session["namespace"]))
    embedded = _session.get("embedded")
    if embedded is not None:
        embedded.stop()  # type: ignore[attr-defined]
    embedded_index = _session.get("embedded_index")
    if embedded_index is not None:
        embedded_index.stop()  # type: ignore[attr-defined]
        shutil.rmtree(embedded_index.data_dir, ignore_errors=True)  # type: ignore[attr-defined]
    elif _session.get("index_url"):
        drop_index_database(str(_session["index_url"]))


@pytest.fixture(scope="session")
def index_url() -> str:
    return str(_session["index_url"])


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(str(_session["url"]))


@pytest.fixture(scope="session")
def namespace() -> str:
    return str(_session["namespace"])


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(str(_session["data_dir"]))


@pytest.fixture
def upload_dir(data_dir: Path) -> Path:
    path = data_dir / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def isolated(redis_client: redis.Redis, namespace: str) -> Iterator[None]:
    """This test's Redis state and index start empty (the session's keys and database)."""
    flush_namespace(redis_client, namespace)
    empty_index(str(_session["index_url"]))
    yield


class WorkerFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ServiceProcess] = []

    def start(
        self, queues: str = "", concurrency: int = 1, wait: bool = True, **env_overrides: str
    ) -> ServiceProcess:
        from morag.core.config import settings
        from morag.core.redis_conn import get_redis
        from morag.services.workers import WorkerRegistry

        name = f"w{len(self.started)}-{uuid.uuid4().hex[:6]}@localhost"
        env = {**os.environ, **{f"MORAG_{k.upper()}": v for k, v in env_overrides.items()}}
        args = ["worker", f"--concurrency={concurrency}", f"--hostname={name}"]
        if queues:
            args.append(f"--queues={queues}")
        worker = ServiceProcess(args, env, self.tmp_path / f"{name.split('@')[0]}.log")
        self.started.append(worker)
        if wait:
            registry = WorkerRegistry(get_redis(settings.redis_url), settings.key_prefix)
            wait_for(
                lambda: (
                    any(w.hostname == name for w in registry.live_workers()) or not worker.alive()
                ),
                30,
                f"worker {name} to be ready",
            )
            assert worker.alive(), worker.log()
        return worker

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(isolated: None, tmp_path: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def api_server(isolated: None, tmp_path: Path) -> Iterator[str]:
    """A ``morag api`` process on a free port; yields its base URL."""
    base, server = start_api(tmp_path / "api.log")
    yield base
    server.stop()
