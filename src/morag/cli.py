"""The ``morag`` command: run the service (``up``, ``worker``, ``api``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="morag: asynchronous ingestion for RAG pipelines.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues to consume")] = "",
    concurrency: Annotated[int, typer.Option(help="processes (default: settings)")] = 0,
    hostname: Annotated[str, typer.Option(help="worker name, e.g. docs@%h")] = "",
    loglevel: Annotated[str, typer.Option()] = "",
) -> None:
    """Run a Celery worker (all five queues unless --queues)."""
    from morag.core.celery_app import celery_app
    from morag.core.config import settings

    argv = [
        "worker",
        f"--loglevel={loglevel or settings.log_level}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        f"--queues={queues or ','.join(settings.worker_queues)}",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="interface (default: settings)")] = "",
    port: Annotated[int, typer.Option(help="port (default: settings)")] = 0,
) -> None:
    """Serve the HTTP API."""
    from morag.api.main import serve

    serve(host or None, port or None)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="API interface")] = "",
    port: Annotated[int, typer.Option(help="API port")] = 0,
    data_dir: Annotated[Path | None, typer.Option(help="uploads, results, embedded Redis")] = None,
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 0,
) -> None:
    """Start everything on this machine: Redis (embedded unless MORAG_REDIS_URL is set),
    a worker for all five queues, and the API. Ctrl-C stops them in reverse order."""
    from morag.core.config import Settings
    from morag.core.embedded_redis import EmbeddedRedis, _die_with_parent

    # Flags become MORAG_* variables, so this process and its children agree on them.
    for name, value in (
        ("API_HOST", host),
        ("API_PORT", port),
        ("DATA_DIR", data_dir),
        ("WORKER_CONCURRENCY", concurrency),
    ):
        if value:
            os.environ[f"MORAG_{name}"] = str(value)
    cfg = Settings()
    env = dict(os.environ)
    embedded: EmbeddedRedis | None = None
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        if not cfg.redis_explicitly_set:
            embedded = EmbeddedRedis(cfg.data_dir / "redis")
            env["MORAG_REDIS_URL"] = embedded.start()
            typer.echo(f"morag: embedded Redis at {embedded.url} (data in {embedded.data_dir})")
        else:
            typer.echo(f"morag: using Redis at {cfg.redis_url}")
        for name, command in (("worker", "worker"), ("api", "api")):
            # Own session: Ctrl-C reaches only this process, which stops children in order.
            child = subprocess.Popen(
                [sys.executable, "-m", "morag.cli", command],
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            children.append((name, child))
        typer.echo(f"morag: API on http://{cfg.api_host}:{cfg.api_port}  (Ctrl-C stops)")
        while not stopping and all(c.poll() is None for _, c in children):
            time.sleep(0.2)
        for name, child in children:
            if child.poll() is not None and not stopping:
                typer.echo(f"morag: {name} exited with {child.returncode}; stopping", err=True)
    finally:
        for name, child in reversed(children):  # the API first, then the worker
            _stop_child(name, child)
        if embedded is not None:
            embedded.stop()
        typer.echo("morag: stopped")


def _stop_child(name: str, child: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM (warm shutdown), then SIGKILL; an unfinished job stays unacked and is
    delivered again by the next worker's recovery."""
    if child.poll() is not None:
        return
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        typer.echo(f"morag: {name} did not stop in {timeout:.0f} s; killing it", err=True)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()


if __name__ == "__main__":
    app()
