"""Request heads and connections a hostile client sends, before any key is checked: each
limit of api/server.py answers (431, 503 with Retry-After) or closes the connection, and
the API keeps its memory and keeps answering.

* unfinished request headers (64 MiB each, no end of headers ever sent) from 200
  connections: each is cut at the header-block limit, the API's memory stays put;
* 20,000 headers, one oversized header, more headers than the count allows, an endless
  trailer: refused;
* request heads that never end in time: the connection is closed;
* more connections than the process takes: 503 with Retry-After, /health still answers.
"""

from __future__ import annotations

import select
import socket
import time

from tests.harness import wait_for
from tests.reliability.raw_http import (
    KIB,
    MIB,
    address,
    ask,
    get,
    header_of,
    probe_health,
    raise_nofile,
    read_answer,
    refusal,
    status_of,
)
from tests.reliability.support import RssSampler, Tally


def test_unfinished_huge_headers_leave_memory_put(api_process, report) -> None:
    """200 connections each send a header that never ends, 64 KiB at a time, up to
    64 MiB: each is cut at the header-block limit, and the API's memory stays within
    50 MiB of where it started (on main it grows by every byte sent, and more)."""
    conns, total, piece = 200, 64 * MIB, 64 * KIB
    raise_nofile(conns + 1024)
    base, api = api_process()
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
    filler = b"a" * piece
    socks: dict[socket.socket, int] = {}
    answers: dict[int, bytes] = {}
    with RssSampler(interval=0.05) as rss:
        rss.watch("api", api.pid)
        rss.sample()
        start_mib = rss.peak_mib()["api"]
        for _ in range(conns):
            sock = socket.create_connection(address(base), timeout=10)
            sock.setblocking(False)
            sock.send(head)
            socks[sock] = len(head)
        deadline = time.monotonic() + 120
        grown = 0.0
        while socks and time.monotonic() < deadline:
            readable, writable, _ = select.select(list(socks), list(socks), [], 1)
            for sock in readable:  # an answer, or the end of the connection
                try:
                    answers[sock.fileno()] = sock.recv(65536)
                except OSError:
                    answers[sock.fileno()] = b""
                socks.pop(sock)
                sock.close()
            for sock in writable:
                if sock not in socks:
                    continue
                try:
                    socks[sock] += sock.send(filler)
                except BlockingIOError:
                    pass
                except OSError:  # closed by the server
                    answers[sock.fileno()] = b""
                    socks.pop(sock)
                    sock.close()
                    continue
                if socks[sock] >= total:
                    socks.pop(sock)
                    sock.close()  # sent all 64 MiB without being stopped
                    answers[-len(answers) - 1] = b"not stopped"
            rss.sample()
            grown = rss.peak_mib()["api"] - start_mib
            if grown > 50:
                break  # fail fast, before the machine runs out of memory
        for sock in socks:
            sock.close()
        health = probe_health(base)
    statuses = sorted({status_of(a) if a.startswith(b"HTTP") else a[:20] for a in answers.values()})
    report.record(
        Tally("bounded/200-unfinished-64MiB-headers"),
        answers=str(statuses),
        api_rss_start_mib=start_mib,
        api_rss_peak_mib=rss.peak_mib()["api"],
        health_after_ms=round(health * 1000, 1),
    )
    assert grown <= 50, f"the API grew by {grown:.0f} MiB"
    assert not socks and len(answers) == conns, "connections still sending at the deadline"
    assert b"not stopped" not in answers.values(), statuses
    assert 431 in statuses, statuses  # at least those that read the answer saw a 431


def test_too_many_or_too_large_headers_are_refused(api_process, report) -> None:
    base, _ = api_process()
    # 20,000 headers (~300 KB): refused (431, or the connection closed), not served
    many = ask(base, get("/health", *(b"X-H-%05d: v" % i for i in range(20_000))))
    assert status_of(many) in (0, 431), many[:300]
    # more headers than the count allows, in a few hundred bytes
    counted = ask(base, get("/health", *(b"X-%d: v" % i for i in range(101))))
    error = refusal(counted, 431, "headers_too_large")
    assert error["details"] == {"limit": 100, "unit": "headers"}
    assert header_of(counted, b"connection") == b"close"
    # one header larger than one header may be, the whole head under its limit
    one = ask(base, get("/health", b"X-Big: " + b"a" * (20 * KIB)))
    assert refusal(one, 431, "headers_too_large")["details"] == {
        "limit": 16 * KIB,
        "unit": "bytes",
    }
    # a head larger than the block limit, sent whole
    block = ask(base, get("/health", *(b"X-%d: " % i + b"a" * (8 * KIB) for i in range(10))))
    assert refusal(block, 431, "headers_too_large")["details"]["limit"] == 64 * KIB
    # within every limit: served
    fine = ask(base, get("/health", *(b"X-%d: " % i + b"a" * KIB for i in range(60))))
    assert status_of(fine) == 200, fine[:300]
    # trailers of a chunked body are headers too: an endless one is cut
    with socket.create_connection(address(base), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/ingest/url HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\nX-Trailer: "
        )
        sent = 0
        try:
            while sent < 16 * MIB and not select.select([sock], [], [], 0)[0]:
                sent += sock.send(b"a" * (64 * KIB))
        except OSError:
            pass
        read_answer(sock, timeout=5)
    assert sent < 16 * MIB, "an endless trailer was read to the end"
    assert probe_health(base) < 5
    report.record(Tally("bounded/header-limits"), trailer_cut_after_kib=sent // KIB)


def test_heads_that_never_end_are_closed(api_process) -> None:
    base, _ = api_process(header_timeout_seconds="1")
    started = time.monotonic()
    with (
        socket.create_connection(address(base), timeout=10) as silent,
        socket.create_connection(address(base), timeout=10) as slow,
    ):
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the end
        assert read_answer(silent, timeout=10) == b""
        assert read_answer(slow, timeout=10) == b""
    assert time.monotonic() - started < 8
    assert probe_health(base) < 5  # a head that comes whole is served as ever


def test_connections_past_the_limit_get_503(api_process) -> None:
    base, _ = api_process(max_connections="16")
    idle = [socket.create_connection(address(base), timeout=10) for _ in range(16)]
    try:
        # the server may accept the idle ones a moment after the client sees them open
        answer = wait_for(
            lambda: (a := ask(base, get("/api/v1/status/"))) and status_of(a) == 503 and a,
            10,
            "a request past the connection limit to be answered 503",
        )
        refusal(answer, 503, "unavailable")
        assert header_of(answer, b"retry-after") == b"1"
        assert probe_health(base) < 5  # liveness still answers: the process is busy, alive
    finally:
        for sock in idle:
            sock.close()
    wait_for(
        lambda: status_of(ask(base, get("/api/v1/status/"))) == 200,
        10,
        "requests to be served again once the connections closed",
    )
