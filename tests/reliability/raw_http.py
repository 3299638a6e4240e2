"""Raw HTTP/1.1 over loopback sockets for the tests of the API's limits: they send what
no well-behaved client would (heads that never end, 20,000 headers) and read answers a
client library would hide; and they cost less CPU than httpx, which would compete with
the API for the same cores."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import time
from urllib.parse import urlsplit

import httpx

KIB = 1024
MIB = 1024 * KIB


def raise_nofile(wanted: int) -> int:
    """The soft limit of open files raised towards ``wanted`` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def address(base: str) -> tuple[str, int]:
    url = urlsplit(base)
    return url.hostname or "127.0.0.1", url.port or 80


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def body_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def header_of(answer: bytes, name: bytes) -> bytes | None:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key == name.lower():
            return value.strip()
    return None


def read_answer(sock: socket.socket, timeout: float = 10) -> bytes:
    """What the server sends until it closes (or the head and a JSON body arrived);
    b"" when it closed (or reset) without a word."""
    sock.settimeout(timeout)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            length = header_of(answer, b"content-length") if _ else None
            if length is not None and len(body) >= int(length):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    return answer


def ask(base: str, request: bytes, timeout: float = 10) -> bytes:
    """Send a whole request (as far as the server reads it), return its answer."""
    with socket.create_connection(address(base), timeout=timeout) as sock:
        # refused before the end: its answer may be waiting
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        return read_answer(sock, timeout)


def get(path: str, *headers: bytes) -> bytes:
    lines = [f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def probe_health(base: str) -> float:
    """Seconds for one ``GET /health`` over a new connection (as a liveness probe does)."""
    started = time.perf_counter()
    answer = ask(base, get("/health"))
    assert status_of(answer) == 200, answer[:200]
    return time.perf_counter() - started


def submit_url_job(base: str, key: str | None) -> str:
    """A job that stays queued (no worker runs), owned by ``key``."""
    headers = {"X-API-Key": key} if key else {}
    response = httpx.post(
        f"{base}/api/v1/ingest/url",
        json={"url": f"http://127.0.0.1:9/{os.urandom(6).hex()}", "source_type": "web"},
        headers=headers,
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["task_id"])


def refusal(answer: bytes, status: int, code: str) -> dict:
    """The error of an answer that must be ``status`` with ``code``, in the one shape."""
    assert status_of(answer) == status, answer[:300]
    error = body_of(answer)["error"]
    assert error["code"] == code and error["message"], error
    return error


class Stream:
    """One SSE request over a raw socket: its status, then its frames as they come."""

    def __init__(self, base: str, task_id: str, key: str | None, last_event_id: str = ""):
        self.sock = socket.create_connection(address(base), timeout=30)
        headers = [b"Accept: text/event-stream"]
        if key:
            headers.append(f"X-API-Key: {key}".encode())
        if last_event_id:
            headers.append(f"Last-Event-ID: {last_event_id}".encode())
        lines = [f"GET /api/v1/status/{task_id}/events HTTP/1.1".encode(), b"Host: 127.0.0.1"]
        self.sock.sendall(b"\r\n".join([*lines, *headers]) + b"\r\n\r\n")
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "closed before an answer"
            self.buffer += chunk
        self.head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status = status_of(self.head)

    def refused(self) -> bytes:
        return self.head + b"\r\n\r\n" + read_answer(self.sock) + self.buffer

    def frames(self) -> list[dict[str, str]]:
        """Every frame until the server ends the stream (chunked encoding undone)."""
        raw = self.buffer
        self.sock.settimeout(30)
        while not raw.endswith(b"0\r\n\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            raw += chunk
        body = b""
        while raw:
            size, _, rest = raw.partition(b"\r\n")
            length = int(size, 16)
            if length == 0:
                break
            body, raw = body + rest[:length], rest[length + 2 :]
        frames = []
        for block in body.decode().split("\r\n\r\n"):
            fields: dict[str, str] = {}
            for line in block.split("\r\n"):
                if line:
                    name, _, value = line.partition(": ")
                    fields[name or "comment"] = value
            if fields:
                frames.append(fields)
        return frames

    def close(self) -> None:
        self.sock.close()
