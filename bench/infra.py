"""The benchmark's world: a fresh embedded Redis, key namespaces, and the processes.

Everything runs on this machine, on 127.0.0.1 and a unix socket. Every process is
started in its own session (process group) and killed with its group when the run
ends, whatever way it ends (``Bench.close`` runs from ``finally``, and SIGTERM/SIGINT
are turned into exceptions so it does). Redis is stopped last.

The morag side is configured only through ``MORAG_*`` variables, set in this process
before morag is imported (its settings are built at import) and passed to the children.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    condition: Callable[[], Any], timeout: float, message: str, interval: float = 0.02
) -> Any:
    """Poll ``condition`` until truthy; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """A child gets SIGTERM if the benchmark process dies without cleaning up (Linux)."""
    from morag.core.embedded_redis import _die_with_parent as die

    die()


class Service:
    """A child process in its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_answering(
        self, url: str, timeout: float, what: str, interval: float = 0.1, probe: float = 0.5
    ) -> None:
        """Wait until ``url`` answers 200; raise with the log's tail if the process exits."""
        import httpx

        def answering() -> bool:
            if not self.alive():
                return True
            try:
                return httpx.get(url, timeout=probe).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answering, timeout, what, interval=interval)
        if not self.alive():
            raise RuntimeError(f"{self.name} exited:\n{self.log()[-3000:]}")

    def children(self) -> list[int]:
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL to the whole group."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        self.kill_group(signal.SIGKILL)  # the group: stray pool children too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self._log.close()


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[Any, redis.Redis, Any]]:
    """A fresh embedded Redis of an A/B script's own (as ``morag up`` runs it, AOF on):
    the server, a client on its socket, and its process (for its CPU), stopped after."""
    import psutil

    from morag.core.embedded_redis import EmbeddedRedis  # imports no settings

    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        server.start()
        try:
            client = redis.Redis(unix_socket_path=str(server.socket_path))
            yield server, client, psutil.Process(server.process.pid)  # type: ignore[union-attr]
        finally:
            server.stop()


class Bench:
    """One benchmark run: its Redis, its namespaces, its processes, its files."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        self.run_id = uuid.uuid4().hex[:8]
        self.tmp = Path(tempfile.mkdtemp(prefix="morag-bench-"))
        self.log_dir = self.tmp / "logs"
        self.log_dir.mkdir()
        self.data_dir = self.tmp / "data"
        self.files_dir = self.tmp / "files"  # generated inputs; an allowed root
        self.files_dir.mkdir()
        self.services: list[Service] = []
        self.redis_server: Any = None
        self.redis_url = ""
        self.index_server: Any = None  # the embedded PostgreSQL, started by a group needing it
        self.index_url = ""
        self.morag_ns = f"bench-{self.run_id}-m"
        self.bare_prefix = f"bench-{self.run_id}-b"
        self._worker_seq = 0
        self.shared: dict[str, Any] = {}  # processes handed from one row to the next

    # -- start-up ---------------------------------------------------------------------------
    def start_redis(self) -> None:
        from morag.core.embedded_redis import EmbeddedRedis  # imports no settings

        self.redis_server = EmbeddedRedis(self.tmp / "redis")
        self.redis_url = self.redis_server.start()
        os.environ.update(self.morag_env())

    def start_index(self) -> str:
        """A fresh embedded PostgreSQL + pgvector (the one ``morag up`` runs); its URL is
        handed to every morag process started from now on."""
        if self.index_server is None:
            from morag.core.embedded_postgres import EmbeddedPostgres

            self.index_server = EmbeddedPostgres(self.tmp / "index")
            self.index_url = self.index_server.start()
            os.environ.update(self.morag_env())
        return self.index_url

    def stop_index(self) -> None:
        """Stop the embedded index and delete its data: the next ``start_index`` is fresh,
        and processes started meanwhile get no index URL."""
        if self.index_server is not None:
            self.index_server.stop()
            self.index_server = None
            shutil.rmtree(self.tmp / "index", ignore_errors=True)
        self.index_url = ""
        os.environ.pop("MORAG_INDEX_URL", None)

    @property
    def socket_path(self) -> str:
        return self.redis_url[len("unix://") :]

    @property
    def celery_url(self) -> str:
        return "redis+socket://" + self.socket_path

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket_path)

    def morag_env(self, **overrides: str) -> dict[str, str]:
        """MORAG_* for this run: defaults everywhere except where the run needs its own."""
        env = {
            "MORAG_REDIS_URL": self.redis_url,
            "MORAG_KEY_PREFIX": self.morag_ns,
            "MORAG_BROKER_NAMESPACE": f"{self.morag_ns}:",
            "MORAG_DATA_DIR": str(self.data_dir),
            "MORAG_ALLOWED_ROOTS": str(self.files_dir),
            "MORAG_SSRF_ALLOW": "127.0.0.1",
            "MORAG_LOG_LEVEL": "INFO",
        }
        if self.index_url:
            env["MORAG_INDEX_URL"] = self.index_url
        env.update({f"MORAG_{k.upper()}": v for k, v in overrides.items()})
        return env

    def child_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MORAG_", "BENCH_"))}
        # This checkout's morag first (bench/run --head measures an exported commit).
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
        env.update(extra or {})
        return env

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Service:
        service = Service(name, argv, env, self.log_dir)
        self.services.append(service)
        return service

    def start_morag_worker(
        self, concurrency: int, queues: str = "", wait: bool = True, **overrides: str
    ) -> Service:
        """``morag worker`` (prefork, ``concurrency`` children); waits until registered."""
        self._worker_seq += 1
        name = f"mw{self._worker_seq}-{self.run_id}@localhost"
        args = ["worker", f"--concurrency={concurrency}", f"--hostname={name}"]
        if queues:
            args.append(f"--queues={queues}")
        service = self._start(
            name.split("@")[0],
            [sys.executable, "-m", "morag.cli", *args],
            self.child_env(self.morag_env(**overrides)),
        )
        service.hostname = name  # type: ignore[attr-defined]
        if wait:
            self.wait_morag_worker(service)
        return service

    def wait_morag_worker(self, service: Service, timeout: float = 60) -> None:
        key = f"{self.morag_ns}:worker:{service.hostname}"  # type: ignore[attr-defined]
        client = self.client()
        wait_for(
            lambda: client.exists(key) or not service.alive(),
            timeout,
            f"{service.name} to be ready",
        )
        if not service.alive():
            raise RuntimeError(f"{service.name} exited:\n{service.log()[-3000:]}")
        self.wait_ready_line(service, timeout)

    @staticmethod
    def wait_ready_line(service: Service, timeout: float = 60) -> None:
        """Celery prints '<hostname> ready.' once its consumers are on."""
        wait_for(
            lambda: " ready." in service.log() or not service.alive(),
            timeout,
            f"{service.name} to print ready",
        )
        if not service.alive():
            raise RuntimeError(f"{service.name} exited:\n{service.log()[-3000:]}")

    def bare_ns(self, results: bool) -> str:
        """Broker namespace of a baseline app (results on and off never share a queue)."""
        return f"{self.bare_prefix}{1 if results else 0}:"

    def bare_env(self, results: bool) -> dict[str, str]:
        return {
            "BENCH_BARE_BROKER_URL": self.celery_url,
            "BENCH_BARE_NAMESPACE": self.bare_ns(results),
            "BENCH_BARE_RESULTS": "1" if results else "0",
        }

    def bare_app(self, results: bool) -> Any:
        """The baseline app as a producer in this process."""
        from bench.bare_app import make_app

        return make_app(self.celery_url, self.bare_ns(results), results)

    def start_bare_worker(
        self, concurrency: int, results: bool, wait: bool = True, loglevel: str = "INFO"
    ) -> Service:
        """The baseline worker: ``celery -A bench.bare_app worker`` with the same pool."""
        self._worker_seq += 1
        name = f"bw{self._worker_seq}-{self.run_id}@localhost"
        service = self._start(
            name.split("@")[0],
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.bare_app",
                "worker",
                "--pool=prefork",
                f"--concurrency={concurrency}",
                f"--hostname={name}",
                "--queues=celery",
                f"--loglevel={loglevel}",
            ],
            self.child_env(self.bare_env(results)),
        )
        if wait:
            self.wait_ready_line(service)
        return service

    def start_api(self, **overrides: str) -> tuple[Service, str]:
        """``morag api`` on a free port of 127.0.0.1; returns it and its base URL."""

        port = free_port()
        env = self.child_env(self.morag_env(api_host="127.0.0.1", api_port=str(port), **overrides))
        service = self._start(f"api-{port}", [sys.executable, "-m", "morag.cli", "api"], env)
        base = f"http://127.0.0.1:{port}"
        service.wait_answering(f"{base}/health", 60, "the API to answer")
        return service, base

    def start_flower(self) -> tuple[Service, str]:
        """Flower on morag's app (its unauthenticated API on 127.0.0.1 only)."""

        port = free_port()
        env = self.child_env({**self.morag_env(), "FLOWER_UNAUTHENTICATED_API": "true"})
        service = self._start(
            f"flower-{port}",
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
            env,
        )
        base = f"http://127.0.0.1:{port}"
        service.wait_answering(f"{base}/healthcheck", 60, "Flower to answer")
        return service, base

    def stop(self, service: Service) -> None:
        service.stop()
        if service in self.services:
            self.services.remove(service)

    # -- keys -------------------------------------------------------------------------------
    def flush_morag(self) -> None:
        """Drop the morag side's jobs, queues and results (keep kombu's bindings)."""
        self._flush(f"{self.morag_ns}:")

    def flush_bare(self) -> None:
        self._flush(self.bare_prefix)

    def _flush(self, prefix: str) -> None:
        client = self.client()
        keys = [
            k
            for k in client.scan_iter(match=f"{prefix}*", count=5000)
            if b"_kombu.binding." not in k and b":worker:" not in k
        ]
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])

    # -- shutdown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process (API and workers before Redis), remove the files."""
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {service.name}: {exc}", file=sys.stderr)
        self.services.clear()
        if self.index_server is not None:
            self.index_server.stop()
            self.index_server = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def raise_on_signals() -> None:
    """SIGTERM and SIGHUP end the run through ``finally`` blocks, like Ctrl-C does."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
