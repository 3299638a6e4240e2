"""API processes with settings of their own (``api_factory``), e.g. a small upload limit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.harness import ServiceProcess, free_port, wait_for


@dataclass
class RunningApi:
    url: str
    process: ServiceProcess

    def log(self) -> str:
        return self.process.log()


class ApiFactory:
    """Starts ``morag api`` processes; keyword overrides become ``MORAG_<NAME>`` variables."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ServiceProcess] = []

    def start(self, **env_overrides: str) -> RunningApi:
        port = free_port()
        env = {
            **os.environ,
            "MORAG_API_PORT": str(port),
            "MORAG_API_HOST": "127.0.0.1",
            **{f"MORAG_{k.upper()}": v for k, v in env_overrides.items()},
        }
        server = ServiceProcess(["api"], env, self.tmp_path / f"api-{len(self.started)}.log")
        self.started.append(server)
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/health", timeout=0.5).status_code == 200
            except httpx.HTTPError:
                return not server.alive()

        wait_for(up, 30, "the API to answer")
        assert server.alive(), server.log()
        return RunningApi(base, server)

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()


@pytest.fixture
def api_factory(isolated: None, tmp_path: Path) -> Iterator[ApiFactory]:
    factory = ApiFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApi]:
    """One API process for a module's tests: it holds no state of its own (all is in
    Redis, which each test's ``isolated`` empties), so tests need not pay its start-up."""
    factory = ApiFactory(tmp_path_factory.mktemp("api"))
    yield factory.start()
    factory.stop_all()
