"""``morag up`` keeps the service running (core/supervisor.py): a killed worker or a killed
embedded Redis comes back and jobs complete; a child that cannot run stops everything with
exit code 1 and a message naming it; Ctrl-C leaves nothing running."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from morag.core.config import Settings
from morag.services.workers import WorkerInfo, WorkerRegistry
from tests.harness import ROOT, free_port, wait_for
from tests.reliability.support import Submitter

STATUS = "/api/v1/status"


class MoragUp:
    """``morag up`` with an embedded Redis in its own data dir; output in ``up.log``."""

    def __init__(self, tmp_path: Path, port: int, drop: tuple[str, ...] = (), **env: str) -> None:
        self.data_dir = tmp_path / "data"
        self.log_path = tmp_path / "up.log"
        self.base = f"http://127.0.0.1:{port}"
        dropped = {"MORAG_REDIS_URL", *drop}
        environment = {k: v for k, v in os.environ.items() if k not in dropped}
        environment.update(MORAG_DATA_DIR=str(self.data_dir), **env)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "morag.cli", "up", "--port", str(port)]
                + ["--concurrency", "1"],
                env=environment,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def redis_url(self) -> str:
        found = re.search(r"embedded Redis at (\S+) ", self.log())
        assert found, self.log()
        return found.group(1)

    def processes(self) -> dict[int, str]:
        """Every live process started for this data dir, pid -> command line: ``up``, the
        worker and its pool, and the API inherit its MORAG_DATA_DIR; redis-server rewrites
        its environment with its title, which names its socket."""
        marker = f"MORAG_DATA_DIR={self.data_dir}".encode()
        found = re.search(r"embedded Redis at unix://(\S+) ", self.log())
        names = [str(self.data_dir), *([found.group(1)] if found else [])]
        processes = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                environ = (entry / "environ").read_bytes().split(b"\0")
                if marker in environ or any(name in cmdline for name in names):
                    processes[int(entry.name)] = cmdline.strip()
        return processes

    def child(self, command: str) -> int:
        """The pid of up's child whose command line contains ``command``."""
        for pid, cmdline in self.processes().items():
            if command in cmdline and _parent(pid) == self.process.pid:
                return pid
        raise AssertionError(f"no {command!r} child of morag up: {self.processes()}")

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C; its exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout)

    def clean_up(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.processes():  # only a failed test leaves any
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def morag_up(tmp_path: Path) -> Iterator[MoragUp]:
    up = MoragUp(tmp_path, free_port())
    yield from _running(up)


@pytest.fixture
def morag_up_with_index(tmp_path: Path) -> Iterator[MoragUp]:
    """``up`` with its own embedded index too (no MORAG_INDEX_URL), as on a fresh machine."""
    yield from _running(MoragUp(tmp_path, free_port(), drop=("MORAG_INDEX_URL",)))


def _running(up: MoragUp) -> Iterator[MoragUp]:
    try:
        wait_for(lambda: up.ready() or up.process.poll() is not None, 90, "morag up", 0.2)
        assert up.process.poll() is None, up.log()
        yield up
    finally:
        up.clean_up()


def wait_success(client: httpx.Client, task_id: str, timeout: float = 40) -> dict:
    def final() -> dict | None:
        body = client.get(f"{STATUS}/{task_id}").json()
        return body if body["status"] in ("success", "failure", "revoked") else None

    body = wait_for(final, timeout, f"job {task_id} to finish", interval=0.1)
    assert body["status"] == "success", body
    return body


def upload(client: httpx.Client, text: str) -> str:
    reply = client.post("/api/v1/ingest/file", files={"file": ("notes.md", text.encode())})
    assert reply.status_code == 202, reply.text
    return str(reply.json()["task_id"])


def stop_and_check_nothing_is_left(up: MoragUp) -> None:
    assert up.interrupt() == 0, up.log()
    assert "morag: stopped" in up.log()
    assert up.processes() == {}, "nothing keeps running after Ctrl-C"


@pytest.mark.timeout(120)
def test_a_killed_worker_is_restarted_and_its_jobs_complete(morag_up: MoragUp) -> None:
    up = morag_up
    cfg = Settings(redis_url=up.redis_url())
    registry = WorkerRegistry(redis.Redis.from_url(cfg.redis_url), cfg.key_prefix)
    submitter = Submitter(cfg)
    client = httpx.Client(base_url=up.base, timeout=10)
    try:
        (first,) = wait_for(registry.live_workers, 10, "the worker to register")
        assert first.pid == up.child("morag.cli worker") and os.getpgid(first.pid) == first.pid

        # one job running when the worker dies (2 s of work), one submitted while none runs
        running = submitter.probe(steps=10, step_seconds=0.2)
        wait_for(
            lambda: client.get(f"{STATUS}/{running}").json()["status"] in ("started", "progress"),
            20,
            "the probe job to run",
        )
        os.killpg(first.pid, signal.SIGKILL)  # the worker and its pool, as an OOM kill would
        wait_for(
            lambda: f"worker (pid {first.pid}) was killed by SIGKILL" in up.log(),
            10,
            "morag up to notice",
        )
        queued = upload(client, "# Queued\n\nSubmitted while no worker was running.\n")
        assert up.process.poll() is None, up.log()

        def restarted() -> list[WorkerInfo]:
            return [w for w in registry.live_workers() if w.pid != first.pid]

        (second,) = wait_for(restarted, 30, "a new worker to register")
        assert second.pid == up.child("morag.cli worker")
        assert "restarting it in 1 s (restart 1 of at most 5 within 60 s)" in up.log()

        assert wait_success(client, running)["attempts"] == 2  # recovered, then run again
        wait_success(client, queued)
        assert "api (pid" not in up.log()  # the API never stopped
    finally:
        client.close()
        submitter.close()
    stop_and_check_nothing_is_left(up)


@pytest.mark.timeout(120)
def test_a_killed_embedded_redis_is_restarted_on_its_data(morag_up: MoragUp) -> None:
    up = morag_up
    client = httpx.Client(base_url=up.base, timeout=10)
    try:
        before = upload(client, "# Before\n\nDone before Redis died.\n")
        wait_success(client, before)
        redis_pid = up.child("redis-server")
        os.kill(redis_pid, signal.SIGKILL)
        wait_for(lambda: "redis restarted" in up.log(), 10, "Redis to be restarted")
        assert f"redis (pid {redis_pid}) was killed by SIGKILL" in up.log()
        assert up.child("redis-server") != redis_pid

        wait_for(up.ready, 30, "the service to be ready again", interval=0.2)
        assert client.get(f"{STATUS}/{before}").json()["status"] == "success"  # AOF kept it
        after = upload(client, "# After\n\nSubmitted once Redis was back.\n")
        wait_success(client, after)
    finally:
        client.close()
    stop_and_check_nothing_is_left(up)


@pytest.mark.timeout(120)
def test_a_child_that_cannot_run_stops_everything(tmp_path: Path) -> None:
    """The API's port is taken: the API exits at once, each time it is started."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = MoragUp(
            tmp_path,
            port,
            MORAG_UP_RESTART_BACKOFF_SECONDS="0.1",
            MORAG_UP_RESTART_LIMIT="2",
        )
        try:
            code = up.process.wait(90)
        finally:
            up.clean_up()
    log = up.log()
    assert code == 1, log
    assert "address already in use" in log
    assert log.count("restarting it in") == 2 and "restarting it in 0.2 s" in log
    (verdict,) = [line for line in log.splitlines() if "keeps failing" in line]
    assert verdict.startswith("morag: api (pid ") and "3 exits within 60 s" in verdict
    assert "Look at the api's messages above" in verdict
    assert "morag: stopped" in log
    assert up.processes() == {}


def cli_search(up: MoragUp, question: str) -> list[dict]:
    """``morag search --json`` against up's API."""
    done = subprocess.run(
        [sys.executable, "-m", "morag.cli", "search", question, "--json", "--api-url", up.base],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["hits"])


@pytest.mark.timeout(240)
def test_the_embedded_index_is_supervised_restarted_and_stopped_cleanly(
    morag_up_with_index: MoragUp,
) -> None:
    up = morag_up_with_index
    index_dir = up.data_dir / "index"
    assert f"embedded index (PostgreSQL + pgvector) in {index_dir}" in up.log()
    client = httpx.Client(base_url=up.base, timeout=30)
    try:
        before = wait_success(
            client, upload(client, "# Lighthouse\n\nThe keeper climbs 217 stairs at dusk.\n"), 120
        )
        hits = cli_search(up, "how many steps does the lighthouse keeper climb")
        assert hits and hits[0]["document_id"] == before["result"]["document_id"]

        postgres = up.child(str(index_dir / "pgdata"))
        os.kill(postgres, signal.SIGKILL)
        wait_for(lambda: "index restarted" in up.log(), 60, "the index to be restarted")
        assert f"index (pid {postgres}) was killed by SIGKILL" in up.log()
        assert up.child(str(index_dir / "pgdata")) != postgres

        after = wait_success(
            client, upload(client, "# Bakery\n\nSourdough rises on wild yeast.\n"), 120
        )
        hits = cli_search(up, "what makes the bread rise")
        assert hits and hits[0]["document_id"] == after["result"]["document_id"]
        assert (
            cli_search(up, "lighthouse keeper stairs")[0]["document_id"]
            == (
                before["result"]["document_id"]  # committed before the kill: still there
            )
        )
    finally:
        client.close()
    stop_and_check_nothing_is_left(up)
    # stopped by up (a fast shutdown), not killed by its parent's death
    postgres_log = (index_dir / "postgres.log").read_text()
    assert postgres_log.rstrip().endswith("database system is shut down"), postgres_log[-500:]
    assert "received fast shutdown request" in postgres_log.rsplit("database system is ready", 1)[1]
