"""``GET /metrics`` in the Prometheus text format, and the HTTP request metrics.

The job, queue, worker, webhook and recovery figures are computed from Redis at each
scrape (services/metrics.py says why), so any API process answers for the deployment.
HTTP requests are counted in this process's memory (a few dictionary updates per request:
a Redis call per request would cost the fast paths a round trip) and added to the shared
``<prefix>:metrics:http`` hash every second (a loop the app's lifespan starts and stops)
and before each scrape: every process's
requests are in every answer, late by at most a second; a process killed outright loses
its last second of counts. Requests are labelled by route template
(``/api/v1/status/{task_id}``), never by path, so the series stay bounded.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hmac
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import structlog
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from morag.api.edge import presented_key
from morag.core.config import Settings
from morag.core.errors import AuthenticationError
from morag.core.keys import RedisKeys
from morag.core.principals import ANONYMOUS, Principal
from morag.core.redis_conn import get_redis
from morag.services.metrics import HTTP_SECONDS_BUCKETS, DeploymentMetrics, bound_label

if TYPE_CHECKING:
    from fastapi import FastAPI
    from redis.asyncio import Redis as AsyncRedis

logger = structlog.get_logger(__name__)

#: Seconds between flushes of this process's request counts to Redis.
FLUSH_INTERVAL = 1.0
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_BOUNDS = [*HTTP_SECONDS_BUCKETS, float("inf")]
_LABELS = [bound_label(b) for b in _BOUNDS]
UNMATCHED = "unmatched"  # the route of requests no route answered (404s, refused bodies)

router = APIRouter()


class HttpMetrics:
    """This process's request counts since the last flush."""

    def __init__(self, keys: RedisKeys) -> None:
        self.key = keys.http_metrics
        self._counts: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[tuple[str, str, int], int] = defaultdict(int)  # (m, route, bucket)
        self._sums: dict[tuple[str, str], float] = defaultdict(float)
        self._task: asyncio.Task[None] | None = None
        self._client: AsyncRedis | None = None

    @property
    def flushing(self) -> bool:
        """Whether the flush loop runs (between the lifespan's start and end)."""
        return self._task is not None and not self._task.done()

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in _METHODS:
            method = "other"
        self._counts[(method, route, status)] += 1
        self._buckets[(method, route, bisect.bisect_left(_BOUNDS, seconds))] += 1
        self._sums[(method, route)] += seconds

    def fields(self) -> dict[str, tuple[str, float]]:
        """Take the counts since the last call, as hash fields and increments."""
        counts, buckets, sums = self._counts, self._buckets, self._sums
        self._counts, self._buckets, self._sums = (
            defaultdict(int),
            defaultdict(int),
            defaultdict(float),
        )
        out: dict[str, tuple[str, float]] = {}
        for (method, route, status), n in counts.items():
            out[f"c|{method}|{route}|{status}"] = ("int", n)
        for (method, route, index), n in buckets.items():
            out[f"h|{method}|{route}|{_LABELS[index]}"] = ("int", n)
        for (method, route), total in sums.items():
            out[f"s|{method}|{route}"] = ("float", total)
        return out

    async def flush(self, client: AsyncRedis) -> None:
        fields = self.fields()
        if not fields:
            return
        pipe = client.pipeline(transaction=False)
        for name, (kind, value) in fields.items():
            if kind == "int":
                pipe.hincrby(self.key, name, int(value))
            else:
                pipe.hincrbyfloat(self.key, name, value)
        await pipe.execute()

    def start(self, client: AsyncRedis) -> None:
        """Flush every ``FLUSH_INTERVAL`` on the serving loop, until ``aclose``."""
        if self._task is None:
            self._client = client
            self._task = asyncio.get_running_loop().create_task(self._flush_loop(client))

    async def _flush_loop(self, client: AsyncRedis) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush(client)
            except Exception as exc:  # Redis away: these counts are dropped, later ones kept
                logger.warning("request metrics not flushed", error=str(exc))

    async def aclose(self) -> None:
        """Stop the flushes, flushing once more."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
            if self._client is not None:
                with contextlib.suppress(Exception):
                    await self.flush(self._client)


class HttpMetricsMiddleware:
    """Counts each request by method, route template and status, with its duration."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = scope.get("route")
            self.metrics.record(
                scope["method"],
                getattr(route, "path", None) or UNMATCHED,
                status_code,
                time.perf_counter() - started,
            )


def install_metrics(app: FastAPI, cfg: Settings) -> None:
    """``GET /metrics`` and the request counting middleware (add it outside the others).
    The app's lifespan enters ``metrics_flushing`` so the counts reach Redis every second."""
    app.state.http_metrics = HttpMetrics(RedisKeys(cfg.key_prefix))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        DeploymentMetrics(get_redis(cfg.redis_url), cfg.key_prefix, cfg.broker_namespace)
    )
    app.state.metrics_registry = registry
    app.include_router(router)
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.http_metrics)


@contextlib.asynccontextmanager
async def metrics_flushing(app: FastAPI) -> AsyncIterator[None]:
    """While the app serves: flush its request counts every second, and once more at the end.

    Started by the lifespan, not by a request: a loop that only serves requests (a test
    client that never runs the lifespan) must not be left with a pending task; there the
    counts are flushed by each scrape of ``/metrics``.
    """
    http: HttpMetrics = app.state.http_metrics
    http.start(app.state.ingestion.reads.aio)
    try:
        yield
    finally:
        await http.aclose()


def check_metrics_access(cfg: Settings, principal: Principal | None, presented: str | None) -> None:
    """401 unless the caller may read the deployment's figures: the metrics key
    (``MORAG_METRICS_KEY``) or an admin key; in local single-user mode anyone, unless a
    metrics key is set."""
    if (
        cfg.metrics_key
        and presented
        and hmac.compare_digest(presented.encode(), cfg.metrics_key.encode())
    ):
        return
    # An admin key; in local single-user mode (the anonymous admin) only without a metrics key.
    if (
        principal is not None
        and principal.admin
        and (principal is not ANONYMOUS or not cfg.metrics_key)
    ):
        return
    raise AuthenticationError(
        "GET /metrics needs the metrics key (MORAG_METRICS_KEY) or an admin key "
        "(MORAG_ADMIN_KEYS) as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """The Prometheus exposition of the deployment's metrics."""
    app = request.app
    check_metrics_access(
        app.state.settings, request.scope["state"].get("principal"), presented_key(request.headers)
    )
    http: HttpMetrics = app.state.http_metrics
    try:
        await http.flush(app.state.ingestion.reads.aio)
    except Exception as exc:  # the scrape below answers for Redis (503)
        logger.warning("request metrics not flushed", error=str(exc))
    body = await asyncio.to_thread(generate_latest, app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
