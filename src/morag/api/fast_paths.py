"""Fast paths for the two busiest requests: a plain status read and a plain URL submission.

They answer before FastAPI's routing and dependency solving (about half the API's CPU on
these requests; figures in bench/results), calling the same functions as the routes: the
caller the ``Authentication`` middleware resolved (api/edge.py), ``JobReads.record`` and
``status_response``, ``UrlIngestRequest`` and ``prepare_url``, ``Submissions.asubmit`` and
``accepted_headers``. Whatever is not their plain case goes on to the route unchanged (the
body they read replayed), so every refusal keeps its shape; tests/integration/test_api_wiring.py
holds each answer equal to the route's.

They skip router-level dependencies, so ``install_fast_paths`` refuses to install them when
a router has any dependency but ``authenticate``: a dependency added later (a tenant scope,
a rate limit) must be called here too, or the fast paths removed.
"""

from __future__ import annotations

import json

import redis
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from morag.api.deps import authenticate
from morag.api.routes import ingest, status
from morag.api.schemas import SubmissionResponse, UrlIngestRequest, is_issued_id
from morag.core.principals import ANONYMOUS, Principal
from morag.services.ingestion import IngestionService, JobSpec


def install_fast_paths(app: FastAPI) -> None:
    """Add both fast paths as the innermost middleware (the log line, CORS and the body
    limit still apply)."""
    for router in (status.router, ingest.router):
        _check_dependencies(router)
    app.add_middleware(StatusReadFastPath)
    app.add_middleware(UrlSubmissionFastPath)


def _route(router: APIRouter, endpoint: object) -> APIRoute:
    """The route of ``endpoint``: put in the scope as routing would, for the request
    metrics' route template (api/metrics.py)."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is endpoint)


def _check_dependencies(router: APIRouter) -> None:
    calls = [dependency.dependency for dependency in router.dependencies]
    if calls != [authenticate]:
        raise RuntimeError(
            f"{router.prefix} has router dependencies {calls}: the fast paths "
            "(api/fast_paths.py) would skip them; call them there too"
        )


class StatusReadFastPath:
    """``GET /api/v1/status/{task_id}`` for a job that has a record."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.prefix = status.router.prefix + "/"
        self.route = _route(status.router, status.get_status)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Served under a root path (behind a proxy), requests take the route as usual.
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            path = scope["path"]
            if path.startswith(self.prefix):
                response = await self._answer(scope, path[len(self.prefix) :])
                if response is not None:
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, task_id: str) -> Response | None:
        if not is_issued_id(task_id):
            return None  # the route refuses it, with its 422
        principal = scope["state"]["principal"]  # the Authentication middleware's
        service: IngestionService = scope["app"].state.ingestion
        try:
            info = await service.reads.record(task_id, principal)
        except redis.RedisError:
            return None  # the route reads again and answers for the outage (503)
        if info is None:
            return None  # the route answers 404 (or asks Celery's result backend)
        scope.setdefault("state", {})["task_id"] = task_id  # for the request log line
        scope["route"] = self.route
        return status.status_response(info)


class UrlSubmissionFastPath:
    """``POST /api/v1/ingest/url`` with a JSON body, no Idempotency-Key, a good key and a
    body the route would accept. Once the submission has begun it is answered here, its
    errors by the app's own exception handlers (a second attempt through the route could
    queue twice)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.path = ingest.router.prefix + "/url"
        self.route = next(
            r for r in ingest.router.routes if isinstance(r, APIRoute) and r.path == self.path
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != self.path
            or scope.get("root_path")  # served under a root path: the route as usual
        ):
            await self.app(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
        except Exception as exc:  # a body over the limit: 413, as the route answers it
            await (await _handled(scope, exc))(scope, receive, send)
            return
        spec, principal = self._plain_submission(scope, body)
        if spec is None:
            await self.app(scope, _replay(body, receive), send)
            return
        service: IngestionService = scope["app"].state.ingestion
        scope["route"] = self.route
        try:
            submission = await service.submissions.asubmit(spec, principal=principal)
        except Exception as exc:
            response = await _handled(scope, exc)
        else:
            scope.setdefault("state", {})["task_id"] = submission.task_id  # for the log line
            answer = SubmissionResponse(
                task_id=submission.task_id, status=submission.status, message=submission.message
            )
            response = JSONResponse(
                answer.model_dump(mode="json"),
                status_code=202,
                headers=ingest.accepted_headers(submission),
            )
        await response(scope, receive, send)

    @staticmethod
    def _plain_submission(scope: Scope, body: bytes) -> tuple[JobSpec | None, Principal]:
        """The checked submission, or None when the route must answer."""
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" or "idempotency-key" in headers:
            return None, ANONYMOUS
        principal = scope["state"]["principal"]  # the Authentication middleware's
        try:
            request = UrlIngestRequest.model_validate(json.loads(body))  # as FastAPI does
            spec = ingest.prepare_url(scope["app"].state.ingestion, request)
        except Exception:
            return None, principal  # the route refuses it, with its 422
        return spec, principal


async def _read_body(receive: Receive) -> bytes:
    """The whole request body (BodySizeLimitMiddleware, outside, bounds it)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client left; the route sees an empty body and answers for it
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then the client's own."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _handled(scope: Scope, exc: Exception) -> Response:
    """The app's own answer to ``exc`` (its exception handlers, the most specific first)."""
    handlers = scope["app"].exception_handlers
    for cls in type(exc).__mro__:
        if cls in handlers:
            return await handlers[cls](Request(scope), exc)  # type: ignore[no-any-return]
    raise exc
