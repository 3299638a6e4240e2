"""Hostile URLs through a real web worker, end to end, without a packet leaving loopback.

The worker runs under ``tripwire_worker``: any connection to a non-loopback address is
blocked and recorded, and names never reach DNS (a few fake names answer from a table).
Listeners of the test itself on 127.0.0.1 and ::1 count every request they receive.

* Strict worker (``MORAG_SSRF_ALLOW`` empty): loopback, private, link-local, metadata,
  unique-local, site-local, IETF-protocol and benchmarking targets, NAT64/6to4 forms of
  private addresses, names (an IDN among them) resolving to them, ``file://`` and ``ftp://``
  all end as a FAILURE naming the refusal, with no request at either listener and no
  blocked attempt.
* Loopback-allowed worker (``127.0.0.1`` only, as in the test settings): redirect chains
  ending on ::1, a metadata address or a private name; a redirect loop; a 2 GB response;
  a 2 GB declared length; a page that never finishes; an image; and a normal page, which
  succeeds, also under an IDN host name (punycode and Unicode spellings). A canary address
  is allowed on purpose there, to prove that a target the guard lets through is caught (and
  recorded) by the tripwire instead of leaving the machine.

The guard's refusal table itself (every range, every literal form) is unit-tested with a
recording resolver and connector in tests/unit/test_url_guard.py; not repeated here.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from morag.core.config import settings
from morag.services.jobs import TaskStatus
from tests.reliability.support import audit, wait_all_final

WEB_TASK = "morag.tasks.web_tasks.process_web_task"
AUDIO_TASK = "morag.tasks.audio_tasks.process_audio_task"  # downloads a media URL first
FAKE_HOSTS = {
    "internal.test": ["10.0.0.5"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["127.0.0.1", "192.168.0.7"],
    "v6-internal.test": ["fd00::5"],
    "loop.test": ["127.0.0.1"],
    "canary.test": ["10.9.9.9"],  # allowed on purpose in one test: proves the tripwire bites
    "site-local.test": ["fec0::5"],
    "xn--bcher-kva.test": ["127.0.0.1"],  # an IDN host (bücher.test), asked for in punycode
}
TWO_GB = 2 * 1024**3
ARTICLE = (
    "<html><head><title>A fine page</title></head><body><article><h1>A fine page</h1>"
    + "<p>Plain words about queues that keep every job, for readers.</p>" * 20
    + "</article></body></html>"
).encode()


class Listener(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, family: int) -> None:
        self.address_family = family
        super().__init__((host, 0), Handler)
        self.requests: list[str] = []
        self.sent = 0
        self.stop = threading.Event()
        self.v6_port = 0

    @property
    def port(self) -> int:
        return self.server_address[1]


class Handler(BaseHTTPRequestHandler):
    server: Listener

    def log_message(self, *args: object) -> None:
        pass

    def send(self, status: int, body: bytes = b"", content_type: str = "text/html", **headers):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send(302, Location=location)

    def stream(
        self, declared: int | None, stall: bool = False, content_type: str = "text/html"
    ) -> None:
        """Up to 2 GB (or headers claiming it, then silence); stops when the client leaves."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if declared is not None:
            self.send_header("Content-Length", str(declared))
        self.end_headers()
        block = b"<p>" + b"x" * 65_530 + b"</p>"
        started = time.monotonic()
        try:
            while self.server.sent < TWO_GB and not self.server.stop.is_set():
                if time.monotonic() - started > 30:
                    break  # a client that never gives up must not hang the suite
                if stall:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    self.server.stop.wait(0.05)
                    continue
                self.wfile.write(block)
                self.server.sent += len(block)
        except OSError:
            pass  # the client hung up, as it should

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append(self.path)
        port, v6 = self.server.port, self.server.v6_port
        routes = {
            "/article": lambda: self.send(200, ARTICLE, "text/html; charset=utf-8"),
            "/r1": lambda: self.redirect("/r2"),
            "/r2": lambda: self.redirect(f"http://[::1]:{v6}/secret"),
            "/to-metadata": lambda: self.redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-name": lambda: self.redirect(f"http://internal.test:{port}/secret"),
            "/loop": lambda: self.redirect("/loop"),
            "/huge": lambda: self.stream(None),
            "/huge.mp3": lambda: self.stream(None, content_type="audio/mpeg"),
            "/r1.mp3": lambda: self.redirect(f"http://[::1]:{v6}/secret.mp3"),
            "/huge-declared": lambda: self.stream(TWO_GB, stall=True),
            "/never-ends": lambda: self.stream(100_000, stall=True),
            "/image": lambda: self.send(200, b"\x89PNG\r\n\x1a\n" + bytes(64), "image/png"),
        }
        routes.get(self.path, lambda: self.send(404, b"<h1>no</h1>"))()


def _serve(listener: Listener) -> Listener:
    threading.Thread(
        target=listener.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    return listener


@pytest.fixture
def listeners() -> Iterator[tuple[Listener, Listener]]:
    v4 = _serve(Listener("127.0.0.1", socket.AF_INET))
    try:
        v6 = _serve(Listener("::1", socket.AF_INET6))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    v4.v6_port = v6.port
    yield v4, v6
    for listener in (v4, v6):
        listener.stop.set()
        listener.shutdown()
        listener.server_close()


@pytest.fixture
def tripwire_worker(module_workers, tmp_path: Path):
    log = tmp_path / "tripwire.jsonl"
    log.touch()

    def start(**env: str):
        worker = module_workers(
            "tests.reliability.tripwire_worker",
            queues="web_processing,audio_processing",
            preload_models="false",  # no speech model: these jobs never get that far
            concurrency=2,
            test_tripwire_log=str(log),
            test_fake_hosts=json.dumps(FAKE_HOSTS),
            **env,
        )
        return worker, log

    return start


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _run(submitter, urls: dict[str, str], timeout: float = 90):
    """Submit each URL as a web job, or as an audio job (a media download) when its name
    starts with ``audio``."""
    ids = {
        name: submitter.submit(
            AUDIO_TASK if name.startswith("audio") else WEB_TASK,
            kind="audio" if name.startswith("audio") else "web",
            queue="audio_processing" if name.startswith("audio") else "web_processing",
            kwargs={"url": url},
        )
        for name, url in urls.items()
    }
    records = wait_all_final(submitter.store, list(ids.values()), timeout=timeout)
    return ids, records


def test_forbidden_targets_are_refused_end_to_end(
    tripwire_worker, listeners, submitter, report
) -> None:
    v4, v6 = listeners
    worker, log = tripwire_worker(ssrf_allow="")
    a, b = v4.port, v6.port
    urls = {
        "file": "file:///etc/passwd",
        "ftp": f"ftp://127.0.0.1:{a}/",
        "127.0.0.1": f"http://127.0.0.1:{a}/article",
        "[::1]": f"http://[::1]:{b}/article",
        "localhost": f"http://localhost:{a}/article",
        "mapped-v4-loopback": f"http://[::ffff:127.0.0.1]:{a}/article",
        "0.0.0.0": f"http://0.0.0.0:{a}/article",
        "decimal-loopback": f"http://2130706433:{a}/article",
        "metadata-169.254.169.254": "http://169.254.169.254/latest/meta-data/",
        "metadata-fd00:ec2::254": "http://[fd00:ec2::254]/latest/meta-data/",
        "10/8": "http://10.1.2.3/",
        "172.16/12": "http://172.16.0.1/",
        "172.31.255.255": "http://172.31.255.255/",
        "192.168/16": "http://192.168.1.1/",
        "fc00::/7": "http://[fc00::1]/",
        "link-local-v6": "http://[fe80::1]/",
        "name->10.0.0.5": f"http://internal.test:{a}/article",
        "name->metadata": "http://metadata.test/latest/meta-data/",
        "name->loopback+private": f"http://mixed.test:{a}/article",
        "name->fd00::5": "http://v6-internal.test/",
        "name->127.0.0.1": f"http://loop.test:{a}/article",
        "192.0.0/24": "http://192.0.0.9/",
        "198.18/15": "http://198.18.0.1/",
        "fec0::/10": "http://[fec0::1]/",
        "name->fec0::5": "http://site-local.test/",
        "NAT64 of 10.0.0.5": "http://[64:ff9b::a00:5]/",
        "6to4 of 127.0.0.1": f"http://[2002:7f00:1::1]:{a}/article",
        "idn name->127.0.0.1": f"http://bücher.test:{a}/article",
        "audio 127.0.0.1": f"http://127.0.0.1:{a}/huge.mp3",
        "audio metadata": "http://169.254.169.254/latest/a.mp3",
        "audio name->10.0.0.5": f"http://internal.test:{a}/huge.mp3",
    }
    ids, records = _run(submitter, urls)
    tally = audit("hostile-urls/strict", submitter.store, list(ids.values()), records)
    outcomes = {n: f"{records[i].status.value}:{records[i].error_type}" for n, i in ids.items()}
    blocked = [r for r in _records(log) if r["kind"] in ("connect", "resolve")]
    report.record(
        tally,
        outcomes=outcomes,
        listener_requests=len(v4.requests) + len(v6.requests),
        tripwire_blocked=len(blocked),
    )
    wrong = {
        name: (records[i].status.value, records[i].error_type, records[i].error)
        for name, i in ids.items()
        if records[i].status is not TaskStatus.FAILURE
        or records[i].error_type not in ("ForbiddenTargetError", "InvalidInputError")
        or records[i].attempts != 1
    }
    assert not wrong, wrong
    assert v4.requests == [] and v6.requests == []
    assert blocked == [], blocked
    assert worker.alive()


def test_hostile_responses_end_clearly_end_to_end(
    tripwire_worker, listeners, submitter, report
) -> None:
    v4, v6 = listeners
    worker, log = tripwire_worker(
        ssrf_allow="127.0.0.1,10.9.9.9",
        web_timeout_seconds="2",
        max_web_bytes=str(1024 * 1024),
        max_upload_bytes=str(1024 * 1024),  # the cap of a media download
    )
    base = f"http://127.0.0.1:{v4.port}"
    expected = {
        "redirect-chain->[::1]": ("/r1", "ForbiddenTargetError"),
        "redirect->metadata": ("/to-metadata", "ForbiddenTargetError"),
        "redirect->private-name": ("/to-name", "ForbiddenTargetError"),
        "redirect-loop": ("/loop", "InvalidInputError"),
        "2GB-response": ("/huge", "LimitExceededError"),
        "2GB-declared": ("/huge-declared", "LimitExceededError"),
        "never-finishes": ("/never-ends", "TransientError"),
        "image": ("/image", "UnsupportedFormatError"),
        "audio redirect->[::1]": ("/r1.mp3", "ForbiddenTargetError"),
        "audio 2GB": ("/huge.mp3", "LimitExceededError"),
        "audio that is a page": ("/article", "UnsupportedFormatError"),
        "normal-page": ("/article", None),
        "idn-page": (f"http://xn--bcher-kva.test:{v4.port}/article", None),
        "unicode-idn-page": (f"http://bücher.test:{v4.port}/article", None),
        "canary": (f"http://canary.test:{v4.port}/article", "TransientError"),
    }
    started = time.monotonic()
    urls = {n: path if "://" in path else base + path for n, (path, _) in expected.items()}
    ids, records = _run(submitter, urls)
    elapsed = time.monotonic() - started
    tally = audit(
        "hostile-urls/responses",
        submitter.store,
        list(ids.values()),
        records,
        # a timeout and a refused connection are transient: retried up to max_attempts
        {ids["never-finishes"]: settings.max_attempts, ids["canary"]: settings.max_attempts},
    )
    outcomes = {}
    for name, task_id in ids.items():
        info = records[task_id]
        took = (info.finished_at - info.created_at).total_seconds()
        outcomes[name] = f"{info.status.value}:{info.error_type} {took:.1f}s"
    blocked = [r for r in _records(log) if r["kind"] in ("connect", "resolve")]
    canary = [r for r in blocked if "10.9.9.9" in r["target"]]
    report.record(
        tally,
        outcomes=outcomes,
        canary_attempts_blocked=len(canary),
        bytes_sent_by_2GB_server_mib=round(v4.sent / 2**20, 1),
        v6_requests=len(v6.requests),
        tripwire_blocked=len(blocked),
        wall_s=round(elapsed, 1),
    )
    for name, (_, error_type) in expected.items():
        info = records[ids[name]]
        if error_type is None:
            assert info.status is TaskStatus.SUCCESS, (name, info.error)
        else:
            assert info.status is TaskStatus.FAILURE, (name, info.status)
            assert info.error_type == error_type, (name, info.error_type, info.error)
            assert info.error and "Traceback" not in info.error
    assert "/secret" not in v4.requests and v6.requests == []
    assert canary, "the tripwire did not see the canary's connection attempts"
    assert [r for r in blocked if r not in canary] == [], blocked
    assert v4.sent < 64 * 2**20  # the worker stopped reading at its 1 MiB cap
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert worker.alive()
