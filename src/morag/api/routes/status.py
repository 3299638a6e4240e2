"""Following jobs: status, result, history, live events (SSE), the job list, queue stats."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse

from morag.api.deps import Caller, ServiceDep, authenticate
from morag.api.errors import error_responses
from morag.api.event_stream import EventStream, frame
from morag.api.schemas import (
    JobHistory,
    JobKind,
    JobList,
    JobResult,
    JobStatus,
    QueueStats,
    TaskId,
)
from morag.core.errors import MoragError, NotFoundError
from morag.core.redaction import redact_url
from morag.services.jobs import FINAL_STATES, TaskInfo, TaskStatus

router = APIRouter(prefix="/api/v1/status", tags=["status"], dependencies=[Depends(authenticate)])


FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)
#: Seconds between SSE comments that keep idle connections (and proxies) open.
SSE_PING_SECONDS = 15
#: Seconds one write to a stream may wait for a client that does not read.
SSE_SEND_TIMEOUT_SECONDS = 30
#: The reconnection delay sent to clients (``retry:``, ms): spread, so the streams a
#: restart cut do not all come back in the same instant.
SSE_RETRY_MS = (1000, 3000)

# One Server-Sent Event (OpenAPI 3.1 reads a text/event-stream schema as one event).
_SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "type": "string",
            "description": "the job's state after this event; 'error' (data: the error "
            "shape) when the stream cannot go on",
        },
        "id": {"type": "string", "description": "the event's timestamp (ISO 8601, UTC)"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "the event: ts, state, progress, stage, message, attempt, "
            "task_id, and any fields of other event kinds",
        },
    },
}


def job_status(info: TaskInfo) -> JobStatus:
    # the record keeps the full webhook URL for delivery; answers show it without secrets
    hook = redact_url(info.webhook_url) if info.webhook_url else None
    return JobStatus.model_validate({**info.to_dict(), "webhook_url": hook})


@router.get(
    "/", response_model=JobList, summary="List jobs", responses=error_responses(401, 422, 500)
)
def list_jobs(
    service: ServiceDep,
    principal: Caller,
    state: Annotated[list[TaskStatus] | None, Query(description="repeat to allow several")] = None,
    kind: JobKind | None = None,
    created_after: Annotated[
        datetime | None, Query(description="inclusive; UTC if no zone")
    ] = None,
    created_before: Annotated[
        datetime | None, Query(description="inclusive; UTC if no zone")
    ] = None,
    owner: Annotated[
        str | None,
        Query(
            max_length=64,
            description="only this owner's jobs (for an admin key; other keys always see "
            "their own)",
        ),
    ] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> JobList:
    """The caller's jobs newest first, filtered by state, kind and creation time, a page at
    a time (an admin key sees every owner's)."""
    items, next_offset = service.reads.list_jobs(
        principal,
        owner=owner,
        states=state or (),
        kind=kind,
        created_after=created_after,
        created_before=created_before,
        offset=offset,
        limit=limit,
    )
    return JobList(
        items=[job_status(i) for i in items], offset=offset, limit=limit, next_offset=next_offset
    )


@router.get(
    "/stats/queues",
    response_model=QueueStats,
    summary="Queue statistics",
    responses=error_responses(401, 500),
)
def queue_stats(service: ServiceDep) -> dict[str, Any]:
    """Pending messages and consumers per queue, messages in flight, live workers."""
    return service.reads.queue_stats()


@router.get(
    "/{task_id}",
    response_model=JobStatus,
    summary="A job's status",
    responses=error_responses(401, 404, 422, 500),
)
async def get_status(
    task_id: TaskId, request: Request, service: ServiceDep, principal: Caller
) -> Response:
    """State, progress, stage, message, timestamps, attempts, error and result summary."""
    request.state.task_id = task_id
    return status_response(await service.reads.astatus(task_id, principal))


def status_response(info: TaskInfo) -> Response:
    """The JobStatus JSON, serialised once: returned as a model, FastAPI would validate it
    again through response_model (which stays for the OpenAPI document)."""
    return Response(job_status(info).model_dump_json(), media_type="application/json")


@router.get(
    "/{task_id}/result",
    response_model=JobResult,
    summary="A job's result",
    responses=error_responses(401, 404, 409, 422, 500),
)
def get_result(
    task_id: TaskId,
    request: Request,
    service: ServiceDep,
    principal: Caller,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="first chunk")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="chunks per page")] = 100,
    include_markdown: bool = True,
) -> dict[str, Any]:
    """The Markdown, metadata and a page of chunks of a job that succeeded (409 otherwise)."""
    request.state.task_id = task_id
    return service.reads.result(
        task_id, principal, offset=offset, limit=limit, include_markdown=include_markdown
    )


@router.get(
    "/{task_id}/artifacts/{name}",
    summary="A file a job produced (a video keyframe)",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/jpeg": {}, "application/octet-stream": {}}},
        **error_responses(401, 404, 422, 500),
    },
)
def get_artifact(
    task_id: TaskId,
    request: Request,
    service: ServiceDep,
    principal: Caller,
    name: Annotated[str, Path(min_length=1, max_length=200, description="artefact name")],
) -> FileResponse:
    """Artefacts are listed in the result; files live in shared storage (artifact_dir)."""
    request.state.task_id = task_id
    path, media_type = service.reads.artifact_path(task_id, name, principal)
    return FileResponse(path, media_type=media_type, filename=name)


@router.get(
    "/{task_id}/history",
    response_model=JobHistory,
    summary="A job's history",
    responses=error_responses(401, 404, 422, 500),
)
def get_history(
    task_id: TaskId, request: Request, service: ServiceDep, principal: Caller
) -> dict[str, Any]:
    """Every state change and progress step, timestamped, oldest first."""
    request.state.task_id = task_id
    return {"task_id": task_id, "events": service.reads.history(task_id, principal)}


@router.get(
    "/{task_id}/events",
    response_class=EventStream,
    summary="Follow a job live (Server-Sent Events)",
    responses={
        200: {
            "description": "a stream of events, each described by this schema",
            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
        },
        **error_responses(401, 404, 422, 429, 500, 503),
    },
)
async def follow_job(
    task_id: TaskId,
    request: Request,
    service: ServiceDep,
    principal: Caller,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
) -> EventStream:
    """The job's history, then its live events, until it reaches a final state; then the
    stream closes. Each event's name is the job's state, its id the event's timestamp
    (reconnect with ``Last-Event-ID`` to skip what you have seen), its data the event as
    JSON (``ts, state, progress, stage, message, attempt``, plus ``task_id``).

    A stream is closed after ``MORAG_SSE_MAX_SECONDS`` (300 s): reconnect with
    ``Last-Event-ID`` (browsers do, after the ``retry:`` delay sent). One client holds
    at most ``MORAG_SSE_MAX_STREAMS_PER_OWNER`` streams per server process (429 beyond),
    the process ``MORAG_SSE_MAX_STREAMS`` (503); both with Retry-After."""
    request.state.task_id = task_id
    slot = service.streams.acquire(principal.name)
    try:
        if await service.reads.record(task_id, principal) is None:
            raise NotFoundError(f"no job with id {task_id}")
        following = await service.follower.open(task_id, after=last_event_id)
    except BaseException:
        slot.release()
        raise
    until = time.monotonic() + service.settings.sse_max_seconds

    async def frames() -> AsyncIterator[bytes]:
        retry: int | None = random.randint(*SSE_RETRY_MS)  # sent with the first event
        state = ""
        try:
            async for event in following.events(until, heartbeat=SSE_PING_SECONDS):
                if event is None:
                    yield frame(comment="ping")
                    continue
                state = str(event.get("state", "message"))
                yield frame(
                    event=state,
                    id=str(event.get("ts", "")),
                    data=json.dumps({**event, "task_id": task_id}),
                    retry=retry,
                )
                retry = None
        except MoragError as exc:
            # The stream has started (200 sent): the error becomes its last event.
            yield frame(event="error", data=json.dumps({"error": exc.to_dict()}))
            return
        if state not in FINAL_VALUES:
            # The time is up, or the server stops: the client comes back for the rest.
            yield frame(
                comment="this stream ends here; reconnect with Last-Event-ID",
                retry=random.randint(*SSE_RETRY_MS),
            )

    def closed() -> None:
        following.close()  # also when the client left before the first frame
        slot.release()

    return EventStream(frames(), send_timeout=SSE_SEND_TIMEOUT_SECONDS, on_close=closed)
