"""Liveness and readiness.

``/health`` answers without touching anything. ``/health/ready`` pings Redis and reads
the worker registry (one round trip, no remote-control broadcast), so it answers in
milliseconds whether or not workers run; 503 when Redis is down or a queue has no
consumer, naming those queues.
"""

from __future__ import annotations

import redis
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from morag.core.config import ALL_QUEUES, Settings
from morag.services.task_manager import TaskManager

logger = structlog.get_logger(__name__)
router = APIRouter(tags=["health"])

_ping_clients: dict[str, redis.Redis] = {}


def _ping_client(url: str) -> redis.Redis:
    # Short timeouts: a health check must not hang on an unreachable Redis.
    if url not in _ping_clients:
        _ping_clients[url] = redis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5
        )
    return _ping_clients[url]


@router.get("/health")
async def liveness() -> dict[str, str]:
    """The process is up (async: answered in the event loop, with no hop to a thread)."""
    return {"status": "alive"}


@router.get("/health/ready", responses={503: {"description": "not ready"}})
def readiness(request: Request) -> JSONResponse:
    """Redis reachable and every queue consumed by at least one live worker.

    ``services`` keeps the seed's contract: ``redis`` and ``celery`` are each exactly
    ``healthy`` or ``unhealthy``. The live workers' names and a short reason per unhealthy
    service stand beside it. This answer needs no key, so it never carries an exception's
    text or a file path (a Redis URL may be a socket path in the user's home): those are
    logged.
    """
    settings: Settings = request.app.state.settings
    task_manager: TaskManager = request.app.state.ingestion.task_manager
    services = {"redis": "healthy", "celery": "unhealthy"}
    reasons: dict[str, str] = {}
    workers: list[str] = []
    queues_without_consumers: list[str] = []
    try:
        _ping_client(settings.redis_url).ping()
    except redis.RedisError as exc:
        logger.warning("readiness: Redis is unreachable", error=str(exc))
        services["redis"] = "unhealthy"
        reasons["redis"] = reasons["celery"] = "Redis is unreachable"
    if services["redis"] == "healthy":
        stats = task_manager.get_queue_stats(include_active=False)
        queues_without_consumers = [q for q in ALL_QUEUES if not stats["queues"][q]["consumers"]]
        workers = list(stats["workers"])
        if workers:
            services["celery"] = "healthy"
        else:
            reasons["celery"] = "no live worker"
    ready = services["redis"] == services["celery"] == "healthy" and not queues_without_consumers
    body = {
        "status": "ready" if ready else "not_ready",
        "services": services,
        "reasons": reasons,
        "workers": workers,
        "queues_without_consumers": queues_without_consumers,
    }
    return JSONResponse(body, status_code=200 if ready else 503)
