"""A crowd of SSE followers, run as a process of its own so that its CPU does not share a
GIL with the test that probes the API meanwhile.

    python -m tests.reliability.sse_crowd --base http://127.0.0.1:PORT --streams 2000 \
        --parallel 100 --key K1 --key K2 ... TASK_ID [TASK_ID ...]

Opens ``--streams`` streams of ``GET /api/v1/status/{id}/events`` over raw loopback
sockets (the ids and the keys taken in turn), at most ``--parallel`` being opened at a
time. A stream counts as open once its first event arrived (the server subscribed and
read the history). Prints one JSON line when every stream is open or refused, holds them
(reading what comes) until its stdin closes, then prints a last JSON line and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

from tests.reliability.raw_http import raise_nofile


async def open_stream(
    host: str, port: int, task_id: str, key: str | None, held: list[asyncio.StreamWriter]
) -> str:
    """Open one stream; 'open' once its first event came, else the status it got."""
    reader, writer = await asyncio.open_connection(host, port)
    auth = f"X-API-Key: {key}\r\n" if key else ""
    writer.write(
        f"GET /api/v1/status/{task_id}/events HTTP/1.1\r\nHost: {host}\r\n"
        f"Accept: text/event-stream\r\n{auth}\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    if status != "200":
        writer.close()
        return status
    seen = b""
    while b"data:" not in seen:
        chunk = await reader.read(65536)
        if not chunk:
            writer.close()
            return "closed"
        seen += chunk
    held.append(writer)
    asyncio.get_running_loop().create_task(drain(reader))
    return "open"


async def drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def crowd(args: argparse.Namespace) -> None:
    url = urlsplit(args.base)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    keys = args.key or [None]
    outcomes: Counter[str] = Counter()
    held: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(args.parallel)

    async def one(i: int) -> None:
        async with gate:
            try:
                outcome = await open_stream(
                    host, port, args.task_ids[i % len(args.task_ids)], keys[i % len(keys)], held
                )
            except (OSError, asyncio.IncompleteReadError) as exc:
                outcome = type(exc).__name__
            outcomes[outcome] += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(args.streams)))
    print(
        json.dumps({"outcomes": outcomes, "seconds": round(time.monotonic() - started, 3)}),
        flush=True,
    )
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in held:
        writer.close()
    print(json.dumps({"closed": len(held)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=100)
    parser.add_argument("--key", action="append")
    parser.add_argument("task_ids", nargs="+")
    args = parser.parse_args()
    raise_nofile(args.streams + 256)
    asyncio.run(crowd(args))


if __name__ == "__main__":
    main()
