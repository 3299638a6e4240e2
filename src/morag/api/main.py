"""The FastAPI app. ``python src/morag/api/main.py`` serves it on port 8000.

Middleware, outermost first: one structured log line per request; the Host allow-list;
CORS (when ``cors_origins`` is set); the Origin check and the key check (api/edge.py);
event streams opened a few at a time (api/event_stream.py); the request-body size limit
(413 in the one error shape); the fast paths of plain status reads and URL submissions
(api/fast_paths.py). Before all of them, the server bounds request heads and connections
(api/server.py).
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script from a checkout: make ``morag`` importable without installing.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import structlog  # noqa: E402
from celery import Celery  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.middleware.cors import CORSMiddleware  # noqa: E402
from starlette.datastructures import Headers  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402
from starlette.types import ASGIApp, Message, Receive, Scope, Send  # noqa: E402

from morag.api.edge import Authentication, HostAllowList, OriginCheck, check_bind  # noqa: E402
from morag.api.errors import error_response, install_error_handlers  # noqa: E402
from morag.api.event_stream import StreamOpeningGate  # noqa: E402
from morag.api.fast_paths import install_fast_paths  # noqa: E402
from morag.api.metrics import install_metrics, metrics_flushing  # noqa: E402
from morag.api.routes import batches, health, ingest, search, status, ui  # noqa: E402
from morag.core.celery_app import celery_app, create_celery_app  # noqa: E402
from morag.core.config import Settings, settings  # noqa: E402
from morag.core.errors import ConfigurationError  # noqa: E402
from morag.core.logging import (  # noqa: E402
    EscapeControlCharacters,
    configure_logging,
    escape_control,
)
from morag.core.private_files import keep_files_private  # noqa: E402
from morag.services.ingestion import IngestionService  # noqa: E402
from morag.services.search import SearchService  # noqa: E402

#: Paths that need a key when the server has keys (the health checks and docs do not).
PROTECTED_PREFIXES = ("/api/",)

_KIB = 1024
_MIB = 1024 * _KIB


def body_limit(cfg: Settings, path: str, content_type: str) -> int:
    """Largest request body for this endpoint and content type, in bytes.

    Uploads: the file cap plus room for the form fields (per file for a batch); anything
    else: enough for a full batch of URL items with maximal metadata.
    """
    form_fields = cfg.max_metadata_bytes + 64 * _KIB
    if content_type.lower().startswith("multipart/form-data"):
        files = cfg.batch_max_items if path.rstrip("/").endswith("/ingest/batch") else 1
        return files * (cfg.max_upload_bytes + form_fields)
    return _MIB + cfg.batch_max_items * (cfg.max_metadata_bytes + 16 * _KIB)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body is larger than {limit} bytes, the limit for this endpoint"
        )


class BodySizeLimitMiddleware:
    """413 before reading when Content-Length is over the limit; otherwise counts the body
    as it is read and stops it at the limit (also for chunked bodies)."""

    def __init__(self, app: ASGIApp, cfg: Settings) -> None:
        self.app = app
        self.cfg = cfg

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        limit = body_limit(self.cfg, scope["path"], headers.get("content-type", ""))
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = error_response(
                413,
                "limit_exceeded",
                f"the request body is {declared} bytes; the limit for this endpoint is "
                f"{limit} bytes",
                {"max_bytes": limit},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)  # the app's HTTPException handler answers 413
            return message

        await self.app(scope, limited_receive, send)


def render_request_line(
    method: str,
    path: str,
    status: int,
    duration_ms: float,
    task_id: str | None,
    owner: str | None = None,
) -> str:
    """The request line as structlog writes it: through the renderer ``configure_logging``
    set (logfmt or JSON), without the rest of the processor chain. Its text fields are
    escaped as the chain's ``escape_control_characters`` would (a path may hold ``%0d``),
    only when one needs it: a clean field costs one check in C, not the processor's loop."""
    if not method.isprintable():
        method = escape_control(method)
    if not path.isprintable():
        path = escape_control(path)
    if task_id is not None and not task_id.isprintable():
        task_id = escape_control(task_id)
    if owner is not None and not owner.isprintable():
        owner = escape_control(owner)
    render = structlog.get_config()["processors"][-1]
    event = {  # in the order the processor chain would have added the keys
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": duration_ms,
        "task_id": task_id,
        "owner": owner,
        "event": "request",
        "level": "info",
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),  # as TimeStamper
    }
    return str(render(None, "info", event))


class RequestLogMiddleware:
    """One line per request: method, path, status, duration, task id and owner if any.

    The line is rendered by structlog's configured renderer alone and written to its
    output (``render_request_line``): the whole processor chain is too dear per request.
    """

    def __init__(self, app: ASGIApp, cfg: Settings) -> None:
        self.app = app
        self.enabled = logging.getLevelName(cfg.log_level.upper()) <= logging.INFO
        self._sink: Any = None  # structlog's logger (a PrintLogger), once logging is set up

    def write(self, line: str) -> None:
        if self._sink is None:
            self._sink = structlog.get_config()["logger_factory"]()
        self._sink.msg(line)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500
        state = scope.setdefault("state", {})  # routes put the task id here (request.state)

        async def send_and_watch(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            task_id = state.get("task_id") or scope.get("path_params", {}).get("task_id")
            principal = state.get("principal")  # the key's name, never the key
            self.write(
                render_request_line(
                    scope["method"],
                    scope["path"],
                    status_code,
                    round((time.perf_counter() - started) * 1000, 1),
                    task_id,
                    principal.name if principal is not None else None,
                )
            )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with metrics_flushing(app):
        yield
    await app.state.ingestion.aclose()
    app.state.search.close()


def create_app(
    cfg: Settings = settings, *, celery: Celery | None = None, fast_paths: bool = True
) -> FastAPI:
    """The API for these settings; it publishes through ``celery`` (default: an app of its
    own, built from ``cfg``). ``fast_paths=False`` leaves every request to the routes (the
    tests compare both)."""
    app = FastAPI(
        title="morag",
        version="0.1.0",
        description="Asynchronous ingestion: documents, audio, video and web pages become "
        "Markdown and retrieval-ready chunks. Submit work under `/api/v1/ingest`, follow it "
        "under `/api/v1/status`. When the server has API keys, every endpoint but the "
        "health checks needs one (`Authorization: Bearer <key>` or `X-API-Key`). Every "
        'error answers `{"error": {"code", "message", "details"}}`.',
        lifespan=_lifespan,
    )
    app.state.settings = cfg
    app.state.ingestion = IngestionService(cfg, celery or create_celery_app(cfg))
    app.state.search = SearchService(cfg)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(ingest.router)
    app.include_router(status.router)
    app.include_router(batches.router)
    app.include_router(search.router)
    app.include_router(ui.router)  # the dashboard, /ui
    # add_middleware wraps: the last added is the outermost.
    if fast_paths:
        install_fast_paths(app)
    app.add_middleware(BodySizeLimitMiddleware, cfg=cfg)
    app.add_middleware(StreamOpeningGate)  # after the key check: no turn for the unkeyed
    # Who is asking, before any body is read (a deeply nested JSON costs nothing unkeyed).
    app.add_middleware(Authentication, keys=cfg.key_table(), protected=PROTECTED_PREFIXES)
    app.add_middleware(OriginCheck, cors_origins=cfg.cors_origins)
    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "X-API-Key",
                "Content-Type",
                "Idempotency-Key",
                "Last-Event-ID",
            ],
            expose_headers=["Location", "Idempotent-Replayed"],
        )
    install_metrics(app, cfg)  # GET /metrics; counts every request, fast paths' too
    app.add_middleware(HostAllowList, hosts=cfg.api_allowed_hosts())
    app.add_middleware(RequestLogMiddleware, cfg=cfg)
    return app


app = create_app(settings, celery=celery_app)


def serve(host: str | None = None, port: int | None = None) -> None:
    """Serve ``app`` (every way of starting the API comes here: ``morag api``, ``morag
    up``, the Docker image, this module as a script) with the limits of api/server.py."""
    import uvicorn

    from morag.api import server

    configure_logging(settings.log_level, settings.log_json)
    bind = host or settings.api_host
    try:
        check_bind(settings, bind)
    except ConfigurationError as exc:
        sys.exit(f"morag: {exc}")
    keep_files_private(settings)
    served = app
    if bind != settings.api_host:  # the Host allow-list's default names the bind address
        served = create_app(settings.model_copy(update={"api_host": bind}), celery=celery_app)
    # uvicorn's loggers have a handler of their own: escape its lines as ours are (its
    # access log, which formats from the record's arguments, stays off)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["filters"] = {"escape_control": {"()": EscapeControlCharacters}}
    log_config["handlers"]["default"]["filters"] = ["escape_control"]
    server.run(
        served,
        settings,
        host=bind,
        port=port or settings.api_port,
        log_level=settings.log_level.lower(),
        log_config=log_config,
        on_stopping=served.state.ingestion.stop_streams,
    )


if __name__ == "__main__":
    serve()
