"""Fixtures of the reliability scenarios: submitters, a Redis of a scenario's own, worker
processes bound to it, and the report of figures printed at the end of the run.

Set ``MORAG_RELIABILITY_REPORT=<path>`` to also write the figures as JSON.

Nothing here imports ``morag.core.config`` at module level: this file can be loaded before
the session's ``pytest_configure`` sets the MORAG_* environment, and the process-wide
``settings`` must be built from that environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from morag.core.embedded_redis import EmbeddedRedis, find_redis_server
from tests.harness import ROOT, ServiceProcess, free_port, start_api, wait_for
from tests.reliability.report import Report

if TYPE_CHECKING:
    from tests.reliability.support import Submitter

_report = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    return _report


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if not _report.entries:
        return
    terminalreporter.section("reliability figures")
    for entry in _report.entries:
        counts = " ".join(
            f"{k}={entry[k]}"
            for k in ("submitted", "completed", "failed", "revoked", "lost", "duplicated")
        )
        figures = " ".join(f"{k}={v}" for k, v in entry["figures"].items())
        terminalreporter.write_line(f"{entry['scenario']}: {counts} {figures}")
    target = os.environ.get("MORAG_RELIABILITY_REPORT")
    if target:
        _report.write(Path(target))


@pytest.fixture
def submitter(isolated: None) -> Iterator[Submitter]:
    """Submits to the session's Redis and namespace (where ``workers`` run)."""
    from morag.core.config import settings
    from tests.reliability.support import Submitter

    sub = Submitter(settings)
    yield sub
    sub.close()


class ModuleProcess(ServiceProcess):
    """Like ServiceProcess, but runs ``python -m <module> <args>``."""

    def __init__(self, module: str, args: list[str], env: dict[str, str], log_path: Path):
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


class RedisServer:
    """A Redis of one scenario's own: embedded (unix socket) or external (TCP loopback).

    ``stop(sig)`` and ``start()`` again reuse the same data directory and address, as a
    restarted production Redis would.
    """

    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        self.data_dir = data_dir
        self.embedded: EmbeddedRedis | None = None
        self.process: subprocess.Popen[bytes] | None = None
        if kind == "embedded":
            self.embedded = EmbeddedRedis(data_dir)
            self.url = self.embedded.url
        else:
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.embedded is not None:
            self.embedded.start()
            return
        binary = "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary or find_redis_server(),
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--logfile",
                str(self.data_dir / "redis.log"),
            ],
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client) or self.process.poll() is not None, 15, "redis to start")
        assert self.process.poll() is None, (self.data_dir / "redis.log").read_text()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        process = self.embedded.process if self.embedded is not None else self.process
        assert process is not None
        return process

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process = self.proc
        if process.poll() is None:
            process.send_signal(sig)
            process.wait(30)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


class Stack:
    """Workers (and an API) bound to a Redis of the scenario's own."""

    def __init__(self, server: RedisServer, tmp_path: Path) -> None:
        from tests.reliability.support import Submitter, settings_for

        self.server = server
        self.tmp_path = tmp_path
        self.namespace = f"morag-rel-{uuid.uuid4().hex[:6]}"
        self.settings = settings_for(server.url, self.namespace)
        self.env = {
            **os.environ,
            "MORAG_REDIS_URL": server.url,
            "MORAG_KEY_PREFIX": self.namespace,
            "MORAG_BROKER_NAMESPACE": f"{self.namespace}:",
            "MORAG_CELERY_BROKER_URL": "",
            "MORAG_CELERY_RESULT_BACKEND": "",
        }
        self.processes: list[ServiceProcess] = []
        self.submitter = Submitter(self.settings)

    def registry(self):
        from morag.services.workers import WorkerRegistry

        return WorkerRegistry(self.server.client(), self.namespace)

    def start_worker(
        self, queues: str = "celery", concurrency: int = 1, **env_overrides: str
    ) -> ServiceProcess:
        name = f"w{len(self.processes)}-{uuid.uuid4().hex[:6]}@localhost"
        env = {**self.env, **{f"MORAG_{k.upper()}": v for k, v in env_overrides.items()}}
        args = ["worker", f"--concurrency={concurrency}", f"--hostname={name}"]
        args.append(f"--queues={queues}")
        worker = ServiceProcess(args, env, self.tmp_path / f"{name.split('@')[0]}.log")
        self.processes.append(worker)
        registry = self.registry()
        wait_for(
            lambda: any(w.hostname == name for w in registry.live_workers()) or not worker.alive(),
            30,
            f"worker {name} to be ready",
        )
        assert worker.alive(), worker.log()
        return worker

    def start_api(self) -> str:
        base, api = start_api(self.tmp_path / "api.log", env=self.env)
        self.processes.append(api)
        return base

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.submitter.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Callable[[str], Stack]]:
    """Factory: ``own_redis("embedded" | "external")`` starts a Redis and a Stack on it."""
    stacks: list[Stack] = []

    def make(kind: str) -> Stack:
        server = RedisServer(kind, tmp_path / f"redis-{kind}")
        server.start()
        stack = Stack(server, tmp_path)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()  # workers before Redis, or they log retry storms
        with contextlib.suppress(Exception):
            stack.server.stop(signal.SIGKILL)


@pytest.fixture
def module_workers(isolated: None, tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: a worker on the session Redis run from another entry module
    (``start(module, queues=..., concurrency=..., **env_overrides)``)."""
    started: list[ServiceProcess] = []

    def start(
        module: str, queues: str = "celery", concurrency: int = 1, **env_overrides: str
    ) -> ServiceProcess:
        from morag.core.config import settings
        from morag.core.redis_conn import get_redis
        from morag.services.workers import WorkerRegistry

        name = f"m{len(started)}-{uuid.uuid4().hex[:6]}@localhost"
        env = {**os.environ, **{f"MORAG_{k.upper()}": v for k, v in env_overrides.items()}}
        args = ["worker", f"--concurrency={concurrency}", f"--hostname={name}"]
        args.append(f"--queues={queues}")
        worker = ModuleProcess(module, args, env, tmp_path / f"{name.split('@')[0]}.log")
        started.append(worker)
        registry = WorkerRegistry(get_redis(settings.redis_url), settings.key_prefix)
        wait_for(
            lambda: any(w.hostname == name for w in registry.live_workers()) or not worker.alive(),
            30,
            f"worker {name} to be ready",
        )
        assert worker.alive(), worker.log()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def api_process(
    isolated: None, tmp_path: Path
) -> Iterator[Callable[..., tuple[str, ServiceProcess]]]:
    """Factory: a ``morag api`` on the session Redis; ``start(**env_overrides)`` answers its
    base URL and process (whose pid the RSS sampler watches)."""
    started: list[ServiceProcess] = []

    def start(**env_overrides: str) -> tuple[str, ServiceProcess]:
        base, api = start_api(tmp_path / f"api-{len(started)}.log", **env_overrides)
        started.append(api)
        return base, api

    yield start
    for api in started:
        api.stop()
