"""API processes with settings of their own (``api_factory``), e.g. a small upload limit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import ServiceProcess, start_api


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
        base, server = start_api(self.tmp_path / f"api-{len(self.started)}.log", **env_overrides)
        self.started.append(server)
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
