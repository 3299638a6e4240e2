"""Serving the API with uvicorn, bounded before any route (or key check) runs.

uvicorn's httptools protocol takes request heads of any size (httptools holds a header
until it ends: a 64 MiB header costs the process 64 MiB and more), any number of headers,
forever, and any number of connections. ``BoundedHttpToolsProtocol`` counts the bytes of
each request head as they arrive and answers 431 past ``max_header_block_bytes``,
``max_header_bytes`` for one header or ``max_header_count`` headers (trailers of chunked
bodies included); closes a connection whose head is not complete within
``header_timeout_seconds``; and answers 503 with Retry-After past ``max_connections``.

Why httptools with these checks rather than uvicorn's h11 protocol (whose
``h11_max_incomplete_event_size`` bounds the head): h11 is pure Python. Measured on one
API process, 16 keep-alive clients (bench/loadgen.py), 2 shared cores: CPU per status read
410 µs with httptools, 387 µs with these checks, 547 µs with h11; bench rows 2 and 3
(ratio to their baselines, one run each): httptools 0.87 and 1.17, these checks 0.95 and
1.24 (0.81 and 1.39 in a second run), h11 0.97 and 0.69. These checks cost nothing that
shows; h11 costs a third more CPU per read and row 3 its target.
"""

from __future__ import annotations

import asyncio
import gc
import json
import resource
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from morag.core.config import Settings

logger = structlog.get_logger(__name__)

#: Seconds a refused connection is still read (and what comes discarded) after its
#: answer, so the client reads the answer instead of a reset.
LINGER_SECONDS = 2.0
#: Retry-After of the 503 past the connection limit (connections come and go quickly).
BUSY_RETRY_AFTER_SECONDS = 1
#: File descriptors a process needs besides its client connections (Redis, files).
FD_RESERVE = 256
#: Collections of the middle generation between two full collections (Python: 10).
FULL_COLLECTION_EVERY = 1000


@dataclass(frozen=True)
class ServerLimits:
    max_header_count: int
    max_header_bytes: int
    max_header_block_bytes: int
    header_timeout: float
    max_connections: int

    @classmethod
    def from_settings(cls, cfg: Settings) -> ServerLimits:
        return cls(
            max_header_count=cfg.max_header_count,
            max_header_bytes=cfg.max_header_bytes,
            max_header_block_bytes=cfg.max_header_block_bytes,
            header_timeout=cfg.header_timeout_seconds,
            max_connections=cfg.max_connections,
        )


def _error_body(code: str, message: str, details: dict[str, Any]) -> bytes:
    """The API's error shape (api/errors.py), for answers written before any route."""
    return json.dumps({"error": {"code": code, "message": message, "details": details}}).encode()


def _answer_and_close(status: int, reason: str, body: bytes) -> bytes:
    return b"".join(
        [
            f"HTTP/1.1 {status} {reason}\r\n".encode(),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class HeadTooLarge(Exception):
    """Raised in a parser callback; httptools turns it into a parser error."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of ``limits`` (a class attribute:
    uvicorn builds the protocol itself; ``bounded_protocol`` makes the class)."""

    limits: ClassVar[ServerLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Bytes of the head (or of a chunked body's trailers) received so far: counted
        # while the parser holds an unfinished head, which it keeps in memory.
        self._head_bytes = 0
        self._in_head = True
        self._in_trailer = False  # after a chunk header, before its data: maybe trailers
        self._header_count = 0
        self._refusal: tuple[str, int] | None = None  # (which limit, its value)
        self._head_timer: asyncio.TimerHandle | None = None
        self._discarding = False

    # -- counting -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if not (self._in_head or self._in_trailer):
            super().data_received(data)  # a body: the app and the body limit bound it
        else:
            room = self.limits.max_header_block_bytes - self._head_bytes
            if len(data) <= room:
                self._head_bytes += len(data)
                super().data_received(data)
            else:
                # Feed what the limit allows; if the head (or trailer) ended within it,
                # the rest is a body or the next request, else it is too large.
                self._head_bytes += room
                super().data_received(data[:room])
                if self.transport.is_closing() or self._discarding:
                    return
                if self._in_head or self._in_trailer:
                    self._refuse(("block", self.limits.max_header_block_bytes))
                    return
                self.data_received(data[room:])
                return
        if self._in_head and self._head_timer is None and self._head_bytes:
            self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_late)

    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_header_count:
            self._refusal = ("count", self.limits.max_header_count)
            raise HeadTooLarge
        if len(name) + len(value) > self.limits.max_header_bytes:
            self._refusal = ("one", self.limits.max_header_bytes)
            raise HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._stop_head_timer()
        connections = len(self.connections)
        tasks = len(self.tasks)
        # as uvicorn's limit_concurrency counts, with our answer: connections (this one
        # included) and requests in progress
        if (
            connections > self.limits.max_connections or tasks >= self.limits.max_connections
        ) and self.url != b"/health":  # liveness answers: the process is alive, only busy
            app, self.app = self.app, _busy
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()

    def on_chunk_header(self) -> None:
        self._in_trailer = True  # until data or the chunk's end shows it was not the last
        self._head_bytes = 0

    def on_chunk_complete(self) -> None:
        self._in_trailer = False

    def on_body(self, body: bytes) -> None:
        self._in_trailer = False
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_head = True
        self._in_trailer = False
        self._head_bytes = 0
        super().on_message_complete()

    # -- refusing -------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to any parser error, ours (HeadTooLarge) included
        if self._refusal is not None:
            self._refuse(self._refusal)
        else:
            super().send_400_response(msg)

    def _refuse(self, refusal: tuple[str, int]) -> None:
        """431 in the error shape, then read and discard until the client leaves (or
        LINGER_SECONDS), so that it reads the answer rather than a reset."""
        self._discarding = True
        self._stop_head_timer()
        if self._in_head and (self.cycle is None or self.cycle.response_complete):
            which, limit = refusal
            message = {
                "block": f"the request's headers are larger than {limit} bytes, the limit",
                "one": f"a request header is larger than {limit} bytes, the limit",
                "count": f"the request has more than {limit} headers, the limit",
            }[which]
            details = {"limit": limit, "unit": "headers" if which == "count" else "bytes"}
            self.transport.write(
                _answer_and_close(
                    431,
                    "Request Header Fields Too Large",
                    _error_body("headers_too_large", message, details),
                )
            )
        else:
            # trailers, or a response under way: no clean place for an answer
            self.transport.close()
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.transport.resume_reading()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    def _head_late(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


_BUSY = _error_body(
    "unavailable", "this server has as many connections as it takes; retry shortly", {}
)


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The answer past ``max_connections``: 503, Retry-After, the error shape."""
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(_BUSY)),
                (b"retry-after", b"%d" % BUSY_RETRY_AFTER_SECONDS),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _BUSY})


def bounded_protocol(limits: ServerLimits) -> type[BoundedHttpToolsProtocol]:
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits})


def raise_open_files_limit(connections: int) -> int:
    """Raise this process's soft limit of open files to what ``connections`` clients
    need (at most the hard limit); returns how many connections it can hold."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return connections
    wanted = connections + FD_RESERVE
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return min(connections, soft - FD_RESERVE)


def run(
    app: Any,
    cfg: Settings,
    *,
    host: str,
    port: int,
    log_level: str,
    log_config: dict[str, Any] | None = None,
    on_stopping: Callable[[], None] | None = None,
) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT or SIGTERM; ``on_stopping`` runs when
    the shutdown begins (uvicorn then waits for every response to end: streams must)."""
    import uvicorn

    limits = ServerLimits.from_settings(cfg)
    connections = raise_open_files_limit(limits.max_connections)
    if connections < limits.max_connections:
        logger.warning(
            "max_connections lowered: the open files limit is too low",
            max_connections=limits.max_connections,
            lowered_to=connections,
        )
        limits = ServerLimits(**{**limits.__dict__, "max_connections": connections})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=bounded_protocol(limits),
        log_level=log_level,
        log_config=uvicorn.config.LOGGING_CONFIG if log_config is None else log_config,
        access_log=False,  # RequestLogMiddleware logs each request, with its task id
    )

    # The objects of start-up (modules, the app) are never garbage: out of the
    # collector's sight. And a full collection waits for 1,000 middle ones (not 10): each
    # walks every live object, 2,000 held streams make ~300,000, and full collections
    # paused the process 0.2-0.6 s, five or six times while they opened (/health p99
    # 0.15-0.4 s instead of <0.1 s). Cyclic garbage that outlives two young collections
    # waits longer for its full one: with 2,000 streams held the API's RSS was ~147 MB
    # either way.
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            if on_stopping is not None:
                on_stopping()
            await super().shutdown(sockets)

    Server(config).run()
