"""The ``morag`` command: run the service (``up``, ``worker``, ``api``) and use it as a
client (``ingest``, ``status``, ``cancel``, ``jobs``; HTTP logic in ``morag.client``).

Client exit codes: 0 done, 1 the job failed or was cancelled, 2 bad usage, 3 the API
refused the request or could not be reached, 4 ``--timeout`` passed while waiting."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from morag.client import MoragClient

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
    data_dir: Annotated[
        Path | None, typer.Option(help="uploads, results, embedded Redis and index")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="worker processes")] = 0,
) -> None:
    """Start everything on this machine: Redis (embedded unless MORAG_REDIS_URL is set),
    the index (embedded PostgreSQL unless MORAG_INDEX_URL is set),
    a worker for all five queues, and the API. A child that exits is restarted (a crash
    loop stops everything, exit code 1). Ctrl-C stops them in reverse order."""
    from morag.core.config import Settings
    from morag.core.embedded_postgres import EmbeddedPostgres
    from morag.core.embedded_redis import EmbeddedRedis
    from morag.core.errors import ConfigurationError
    from morag.core.private_files import keep_files_private
    from morag.core.supervisor import (
        Child,
        ChildProcess,
        EmbeddedIndexProcess,
        EmbeddedRedisProcess,
        RestartPolicy,
        Supervisor,
    )

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
    from morag.api.edge import check_bind

    try:
        check_bind(cfg, cfg.api_host)  # before anything starts, not when the API child does
    except ConfigurationError as exc:
        typer.echo(f"morag: {exc}", err=True)
        raise typer.Exit(2) from None
    keep_files_private(cfg)  # before Redis starts: its AOF and RDB files are private too
    env = dict(os.environ)
    children: list[Child] = []
    if not cfg.redis_explicitly_set:
        embedded = EmbeddedRedis(cfg.data_dir / "redis")
        env["MORAG_REDIS_URL"] = embedded.url  # the socket path: the same after a restart
        children.append(EmbeddedRedisProcess(embedded))
        typer.echo(f"morag: embedded Redis at {embedded.url} (data in {embedded.data_dir})")
    else:
        typer.echo(f"morag: using Redis at {cfg.redis_url}")
    if not cfg.index_explicitly_set:
        index = EmbeddedPostgres(cfg.data_dir / "index")
        env["MORAG_INDEX_URL"] = index.url  # the socket path: the same after a restart
        children.append(EmbeddedIndexProcess(index))
        typer.echo(f"morag: embedded index (PostgreSQL + pgvector) in {index.data_dir}")
    else:
        typer.echo("morag: using the index at MORAG_INDEX_URL")
    children += [
        ChildProcess(name, [sys.executable, "-m", "morag.cli", name], env)
        for name in ("worker", "api")
    ]
    supervisor = Supervisor(
        children,
        RestartPolicy(
            backoff=cfg.up_restart_backoff_seconds,
            backoff_max=cfg.up_restart_backoff_max_seconds,
            limit=cfg.up_restart_limit,
            window=cfg.up_restart_window_seconds,
        ),
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: supervisor.request_stop())
    typer.echo(f"morag: API on http://{cfg.api_host}:{cfg.api_port}  (Ctrl-C stops)")
    try:
        code = supervisor.run()
    except (ConfigurationError, OSError) as exc:  # Redis could not start
        typer.echo(f"morag: {exc}", err=True)
        code = 1
    typer.echo("morag: stopped")
    if code:
        raise typer.Exit(code)


# --- client commands ------------------------------------------------------------------------

EXIT_JOB_FAILED = 1
EXIT_API_ERROR = 3
EXIT_TIMEOUT = 4

ApiUrl = Annotated[
    str,
    typer.Option(
        "--api-url", envvar="MORAG_API_URL", help="base URL of the morag API", show_envvar=True
    ),
]
ApiKey = Annotated[
    str,
    typer.Option(
        "--api-key",
        envvar="MORAG_API_KEY",
        help="API key, sent as 'Authorization: Bearer'",
        show_default=False,
        show_envvar=True,
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="print the API's JSON answer")]
DEFAULT_API_URL = "http://127.0.0.1:8000"


def _client(api_url: str, api_key: str) -> MoragClient:
    from morag.client import MoragClient

    return MoragClient(api_url or DEFAULT_API_URL, api_key=api_key or None)


@contextmanager
def _api_errors() -> Iterator[None]:
    """An API error becomes a clear message on stderr and exit code 3 (4 on timeout)."""
    from morag.client import MoragApiError

    try:
        yield
    except MoragApiError as exc:
        typer.echo(f"morag: {exc}", err=True)
        for problem in exc.details.get("errors") or []:  # validation errors name the field
            if isinstance(problem, dict):
                where = problem.get("field") or "request"
                typer.echo(f"  {where}: {problem.get('message', '')}", err=True)
        raise typer.Exit(EXIT_TIMEOUT if exc.code == "timeout" else EXIT_API_ERROR) from None


def _show(answer: dict[str, Any], as_json: bool, print_human: Callable[[Any], None]) -> None:
    """An API answer as JSON (``--json``), or for people."""
    if as_json:
        _print_json(answer)
    else:
        print_human(answer)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _fields(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _print_job(job: dict[str, Any]) -> None:
    """A job's status as ``name: value`` lines, result summary indented."""
    progress = float(job.get("progress") or 0.0)
    lines = [
        ("task_id", job.get("task_id")),
        ("status", job.get("status")),
        ("kind", job.get("kind")),
        ("progress", f"{progress * 100:.0f}%"),
        ("stage", job.get("stage")),
        ("message", job.get("message")),
        ("attempts", job.get("attempts")),
        ("created_at", job.get("created_at")),
        ("started_at", job.get("started_at")),
        ("finished_at", job.get("finished_at")),
    ]
    for name, value in lines:
        if value not in (None, ""):
            typer.echo(f"{name}: {value}")
    error = job.get("error")
    if error:
        typer.echo(f"error: {error.get('type') or 'error'}: {error.get('message')}")
    if job.get("result"):
        typer.echo("result:")
        for name, value in job["result"].items():
            typer.echo(f"  {name}: {_fields(value)}")


class _ProgressView:
    """Live progress from the job's events: a rich bar on a terminal, plain lines when
    the output is a file or pipe (one per stage, and every 10% within a stage)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar: Any = None
        self.last: tuple[str, int] = ("", -1)

    def __enter__(self) -> _ProgressView:
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}", markup=False),  # messages are not markup
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task("queued", total=100)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, event: dict[str, Any]) -> None:
        stage = str(event.get("stage") or event.get("state") or "")
        if stage == "webhook":
            return  # delivery reports after the end; not the job's progress
        percent = int(float(event.get("progress") or 0.0) * 100)
        message = str(event.get("message") or "")
        text = f"{stage}: {message}" if message and message != stage else stage
        if self.bar is not None:
            self.bar.update(self.task, completed=percent, description=text)
        elif stage != self.last[0] or percent // 10 != self.last[1] // 10:
            self.console.print(
                f"{percent:3d}% {text}", highlight=False, markup=False, soft_wrap=True
            )
        self.last = (stage, percent)


def _finish(job: dict[str, Any], as_json: bool) -> None:
    """Print a finished job; exit 1 when it did not succeed."""
    if as_json:
        _print_json(job)
    else:
        status = job.get("status")
        label = {"success": "done", "failure": "failed", "revoked": "cancelled"}.get(
            str(status), str(status)
        )
        typer.echo(f"{label}: {job.get('task_id')}")
        _print_job(job)
        document_id = (job.get("result") or {}).get("document_id")
        if document_id:
            typer.echo(f"document: {document_id}")
    if job.get("status") != "success":
        raise typer.Exit(EXIT_JOB_FAILED)


@app.command()
def ingest(
    target: Annotated[str, typer.Argument(help="a file to upload, or an http(s) URL")],
    wait: Annotated[bool, typer.Option("--wait", help="follow the job to its end")] = False,
    source_type: Annotated[
        str | None,
        typer.Option(help="document, audio, video (files; detected when absent) or web (URLs)"),
    ] = None,
    metadata: Annotated[str | None, typer.Option(help="a JSON object stored with the job")] = None,
    webhook_url: Annotated[
        str | None, typer.Option(help="URL that gets a signed event when the job ends")
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="with --wait: give up after this many seconds (0: never)")
    ] = 0.0,
    as_json: JsonOutput = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = "",
) -> None:
    """Submit a file or URL for ingestion; with --wait, show its progress and result."""
    meta: dict[str, Any] | None = None
    if metadata is not None:
        try:
            meta = json.loads(metadata)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from None
        if not isinstance(meta, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--metadata")
    is_url = target.lower().startswith(("http://", "https://"))
    if not is_url and not Path(target).is_file():
        raise typer.BadParameter(f"no such file: {target}", param_hint="TARGET")
    with _api_errors(), _client(api_url, api_key) as client:
        options: dict[str, Any] = {
            "source_type": source_type,
            "metadata": meta,
            "webhook_url": webhook_url,
        }
        if is_url:
            submission = client.ingest_url(target, **options)
        else:
            submission = client.ingest_file(Path(target), **options)
        task_id = submission["task_id"]
        if not wait:
            if as_json:
                _print_json(submission)
            else:
                typer.echo(f"submitted {task_id} ({submission['status']}): {submission['message']}")
            return
        typer.echo(
            f"submitted {task_id}; following it (Ctrl-C stops following, not the job)", err=True
        )
        try:
            with _ProgressView() as view:
                job = client.wait(task_id, on_event=view.update, timeout=timeout or None)
        except KeyboardInterrupt:
            typer.echo(f"stopped following; the job goes on (morag status {task_id})", err=True)
            raise typer.Exit(130) from None
    _finish(dict(job), as_json)


@app.command()
def status(
    task_id: Annotated[str, typer.Argument(help="the job's id")],
    as_json: JsonOutput = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = "",
) -> None:
    """Show a job's state, progress, timestamps, error and result summary."""
    with _api_errors(), _client(api_url, api_key) as client:
        job = dict(client.status(task_id))
    _show(job, as_json, _print_job)


@app.command()
def cancel(
    task_id: Annotated[str, typer.Argument(help="the job's id")],
    as_json: JsonOutput = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = "",
) -> None:
    """Cancel a queued or running job."""
    with _api_errors(), _client(api_url, api_key) as client:
        answer = dict(client.cancel(task_id))
    _show(
        answer,
        as_json,
        lambda a: typer.echo(f"{a.get('outcome', 'cancelled')}: {task_id}: {a.get('message', '')}"),
    )


@app.command()
def jobs(
    state: Annotated[
        str | None,
        typer.Option(
            help="only jobs in this state (pending, started, progress, success, "
            "failure, retry, revoked)"
        ),
    ] = None,
    kind: Annotated[str | None, typer.Option(help="document, audio, video or web")] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many jobs")] = 20,
    as_json: JsonOutput = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = "",
) -> None:
    """List jobs, newest first."""
    with _api_errors(), _client(api_url, api_key) as client:
        page = client.jobs(state=state, kind=kind, limit=limit)
    if as_json:
        _print_json(page)
        return
    items = page.get("items") or []
    if not items:
        typer.echo("no jobs")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Column, Table

    console = Console()
    rows = [
        (
            str(job.get("task_id")),
            str(job.get("status")),
            str(job.get("kind") or ""),
            f"{float(job.get('progress') or 0) * 100:.0f}%",
            str(job.get("created_at") or "")[:16].replace("T", " "),  # fits 80 columns
        )
        for job in items
    ]
    header = ("TASK ID", "STATUS", "KIND", "DONE", "CREATED (UTC)")
    if console.is_terminal:
        # ids whole: the other columns give way on a narrow terminal
        table = Table(
            Column(header[0], no_wrap=True, min_width=36),
            *header[1:],
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # a pipe or file: aligned plain lines, easy to grep and cut
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            typer.echo(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
    if page.get("next_offset") is not None:
        typer.echo(f"(more: raise --limit; next offset {page['next_offset']})", err=True)


def _location(hit: dict[str, Any]) -> str:
    """``p. 3``, ``Intro > Setup``, ``0:12-0:31``: where in its document a hit is."""
    loc = hit.get("location") or {}
    parts = []
    if loc.get("pages"):
        pages = loc["pages"]
        parts.append(f"p. {pages[0]}" + (f"-{pages[-1]}" if len(pages) > 1 else ""))
    if loc.get("start_seconds") is not None:
        start, end = float(loc["start_seconds"]), float(loc.get("end_seconds") or 0)
        parts.append(f"{int(start // 60)}:{start % 60:04.1f}-{int(end // 60)}:{end % 60:04.1f}")
    if loc.get("heading_path"):
        parts.append(" > ".join(loc["heading_path"]))
    return ", ".join(parts)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="a question or keywords")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=100, help="how many hits")] = 10,
    mode: Annotated[str, typer.Option(help="hybrid, vector or keyword")] = "hybrid",
    kind: Annotated[
        list[str] | None, typer.Option(help="only this kind (repeat): document, audio, video, web")
    ] = None,
    as_json: JsonOutput = False,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = "",
) -> None:
    """Search the indexed documents: a table of hits (score, source, location, snippet)."""
    filters = {"kind": kind} if kind else None
    with _api_errors(), _client(api_url, api_key) as client:
        answer = client.search(query, k=k, mode=mode, filters=filters)
    if as_json:
        _print_json(answer)
        return
    hits = answer.get("hits") or []
    if not hits:
        typer.echo("no hits")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("#", "SCORE", "SOURCE", "WHERE", "TEXT", box=box.SIMPLE_HEAD, pad_edge=False)
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(str(hit.get("text") or "").split())
        table.add_row(
            str(rank),
            f"{float(hit.get('score') or 0):.4f}",
            str(hit.get("source") or ""),
            _location(hit),
            snippet[:160] + ("…" if len(snippet) > 160 else ""),
        )
    console.print(table)
    console.print(
        f"{len(hits)} hits ({answer.get('mode')}, {answer.get('took_ms')} ms)", highlight=False
    )


if __name__ == "__main__":
    app()
