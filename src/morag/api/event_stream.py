"""Event streams (SSE): the response, its frames, and the gate that opens them in turn.

``EventStream`` runs one task besides the request's own per stream. sse-starlette's
EventSourceResponse runs a task group of four (the stream, pings, a shutdown watcher, a
disconnect watcher): ~310 objects per held stream that every full garbage collection
walks, ~140 here, and 2,000 held streams took 194 MB instead of 148 MB. Pings come from
the frames' source (the follower wakes every ``heartbeat``), a shutdown ends the source
(``IngestionService.stop_streams``), and one task watches for the client leaving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class EventStream(Response):
    """Sends each frame of ``frames`` (SSE-encoded bytes) as it comes; ends when they
    end, when the client leaves, or when a frame waits ``send_timeout`` seconds for a
    client that does not read. ``on_close`` runs once, however it ended."""

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        send_timeout: float,
        on_close: Callable[[], None] | None = None,
        status_code: int = 200,  # FastAPI's OpenAPI document reads it from here
    ) -> None:
        # Not Response.__init__: it would declare an empty body (content-length: 0).
        self.status_code = status_code
        # on the instance: FastAPI documents a route's errors under its response class's
        # media type, and they are JSON
        self.media_type = "text/event-stream"
        self.background = None
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
        self.frames = frames
        self.send_timeout = send_timeout
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        left = ending = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            if not ending:
                task.cancel()  # wakes the stream wherever it waits

        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for frame in self.frames:
                try:
                    async with asyncio.timeout(self.send_timeout):
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                except TimeoutError:
                    return  # a client that does not read; uvicorn closes the connection
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()  # the client left: the stream's normal end
        finally:
            ending = True
            watcher.cancel()
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()


def frame(
    *,
    event: str | None = None,
    id: str | None = None,
    data: str | None = None,
    retry: int | None = None,
    comment: str | None = None,
) -> bytes:
    """One SSE message (lines end in CRLF; ``data`` must be one line, as JSON is)."""
    lines = []
    if comment is not None:
        lines.append(f": {_one_line(comment)}")
    if event is not None:
        lines.append(f"event: {_one_line(event)}")
    if id is not None:
        lines.append(f"id: {_one_line(id)}")
    if data is not None:
        lines.append(f"data: {_one_line(data)}")
    if retry is not None:
        lines.append(f"retry: {retry}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _one_line(text: str) -> str:
    return text.replace("\r", "").replace("\n", "")


#: Event streams between arriving and sending their first frame, at once.
OPENING_AT_ONCE = 4


class StreamOpeningGate:
    """Event streams are opened a few at a time: a request for one waits here until
    fewer than ``at_once`` others are between arriving and sending their first frame.

    A burst of streams otherwise fills every turn of the event loop with their routing,
    Redis reads and first frames, and every other request waits behind them. 2,000
    streams opened 100 at a time (tests/reliability/test_api_streams.py): /health took
    p50 ~150 ms, p99 0.4-0.9 s while they opened; p50 3-6 ms with 4 at a time (8 ms with
    8; with 12 or more the delays came back), and the streams opened as fast.
    """

    def __init__(self, app: ASGIApp, at_once: int = OPENING_AT_ONCE) -> None:
        self.app = app
        self.turns = asyncio.Semaphore(at_once)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].endswith("/events")
        ):
            await self.app(scope, receive, send)
            return
        await self.turns.acquire()
        holding = True

        async def send_then_free(message: Message) -> None:
            nonlocal holding
            await send(message)
            if holding and message["type"] == "http.response.body":
                holding = False
                self.turns.release()

        try:
            await self.app(scope, receive, send_then_free)
        finally:
            if holding:
                self.turns.release()
