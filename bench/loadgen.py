"""A small HTTP/1.1 load generator: N keep-alive connections, each sending requests one
after another, on asyncio streams.

httpx costs ~2 ms of CPU per request on these machines, as much as the servers measured,
and the client shares the two CPUs with them; this client costs a small fraction of that,
so the figures are the servers'. It speaks just enough HTTP/1.1 for the API and Flower:
``Content-Length`` and ``chunked`` bodies, keep-alive, one request in flight per connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


class LoadError(RuntimeError):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise LoadError("connection closed by the server")
    status = int(status_line.split(b" ", 2)[1])
    length = -1
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip())
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                break
            body += await reader.readexactly(size)
            await reader.readline()
        return status, bytes(body)
    return status, await reader.readexactly(length) if length > 0 else b""


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n".encode()


def post_json(path: str, payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _run(
    base: str, connections: int, requests: list[bytes], expect: int
) -> tuple[float, int, list[tuple[int, bytes]]]:
    url = urlsplit(base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    work = iter(requests)
    failures: list[tuple[int, bytes]] = []
    streams = [await asyncio.open_connection(host, port) for _ in range(connections)]

    async def loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for request in work:
            writer.write(request)
            status, body = await _read_response(reader)
            if status != expect:
                failures.append((status, body[:300]))

    started = time.perf_counter()
    try:
        await asyncio.gather(*(loop(r, w) for r, w in streams))
        elapsed = time.perf_counter() - started
    finally:
        for _, writer in streams:
            writer.close()
    return elapsed, len(failures), failures[:3]


def run(
    base: str, connections: int, requests: list[bytes], expect: int
) -> tuple[float, int, list[tuple[int, bytes]]]:
    """Send every request over ``connections`` keep-alive connections: elapsed seconds,
    the number of answers whose status was not ``expect``, and a few of them."""
    return asyncio.run(_run(base, connections, requests, expect))


def requests_for(items: list[Any], build: Callable[[Any], bytes]) -> list[bytes]:
    return [build(item) for item in items]
