"""Hostile input through the API: every case a 4xx with a clear message (the one error
shape), or an accepted job that ends as a FAILURE saying why; the API and the worker
survive, nothing refused is stored.

* a 1 GB upload, streamed from a generator (never on disk), with and without a declared
  Content-Length: refused early (413) at the 200 MB default limit, nothing kept;
* the hostile files of hostile_inputs.py, uploaded, then processed by a real worker;
* malformed requests tests/e2e/test_api.py does not already send (ids, types, nesting).
"""

from __future__ import annotations

import json
import select
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from morag.core.config import settings
from morag.services.jobs import TaskStatus, get_job_store
from tests.reliability.hostile_inputs import FILE_CASES
from tests.reliability.support import RssSampler, Tally, audit, wait_all_final

GIB = 1024**3
MIB = 1024**2


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"] and "Traceback" not in response.text
    return body["error"]


def stream_upload(base: str, total: int, *, declared: bool) -> tuple[int, int, float]:
    """POST a ``total``-byte multipart upload over a raw socket, 1 MiB at a time, stopping
    as soon as the server answers. With a declared length, nothing of the body is sent
    until the server has had 5 s to answer to the headers alone. Returns (status, body
    bytes sent, seconds)."""
    head = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\n"
    )
    tail = b"\r\n--b--\r\n"
    url = urlsplit(base)
    lines = [
        b"POST /api/v1/ingest/file HTTP/1.1",
        f"Host: {url.netloc}".encode(),
        b"Content-Type: multipart/form-data; boundary=b",
        b"Content-Length: %d" % (len(head) + total + len(tail))
        if declared
        else b"Transfer-Encoding: chunked",
    ]

    def frame(data: bytes) -> bytes:
        return data if declared else b"%x\r\n%s\r\n" % (len(data), data)

    block, sent, answer = b"a" * MIB, 0, b""
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        if declared:
            select.select([sock], [], [], 5)  # a server that refuses early answers now
        try:
            sock.sendall(frame(head))
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(frame(block))
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer is waiting
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except ConnectionResetError:
            pass
    elapsed = time.monotonic() - started
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, sent, elapsed


def test_gigabyte_upload_is_refused_early(api_process, upload_dir: Path, report) -> None:
    base, api = api_process()
    limit = settings.max_upload_bytes
    before = set(upload_dir.iterdir())
    figures = {}
    with RssSampler(interval=0.05) as rss:
        rss.watch("api", api.pid)
        rss.sample()
        start_mib = rss.peak_mib()["api"]
        for declared in (True, False):
            status, sent, seconds = stream_upload(base, GIB, declared=declared)
            name = "declared-length" if declared else "chunked"
            figures[name] = f"{status} after {sent // MIB} MiB in {seconds:.2f}s"
            assert status == 413, figures
            # Declared: refused on the headers alone; chunked: cut at the limit.
            assert sent <= (0 if declared else limit + 32 * MIB), figures
    assert httpx.get(f"{base}/health").status_code == 200
    report.record(
        Tally("hostile-api/1GB-upload"),
        limit_mib=limit // MIB,
        outcomes=figures,
        api_rss_start_mib=start_mib,
        api_rss_peak_mib=rss.peak_mib()["api"],
    )
    assert set(upload_dir.iterdir()) == before  # no partial upload kept
    assert rss.peak_mib()["api"] < start_mib + 100  # streamed to disk, not held in memory


def test_hostile_files_through_the_api(
    api_process, workers, upload_dir: Path, report, tmp_path: Path
) -> None:
    base, _ = api_process()
    worker = workers.start(concurrency=2)  # every queue
    store = get_job_store(settings)
    accepted: dict[str, str] = {}
    outcomes: dict[str, str] = {}
    wrong = []
    with httpx.Client(base_url=base, timeout=60) as http:
        for case in FILE_CASES:
            path = case.make(tmp_path / case.filename)
            with path.open("rb") as content:
                response = http.post(
                    "/api/v1/ingest/file", files={"file": (case.filename, content)}
                )
            if response.status_code == 202:
                accepted[response.json()["task_id"]] = case.name
            elif 400 <= response.status_code < 500:
                error = _error(response)
                outcomes[case.name] = f"http {response.status_code} {error['code']}"
                # refused at the door (type or emptiness seen at upload): said clearly
                said = case.says.lower() in error["message"].lower()
                if not case.errors or not said:
                    wrong.append((case.name, response.status_code, error))
            else:
                wrong.append((case.name, response.status_code, response.text[:300]))
        records = wait_all_final(store, list(accepted), timeout=180)
        for task_id, name in accepted.items():
            case = next(c for c in FILE_CASES if c.name == name)
            info = records[task_id]
            outcomes[name] = f"{info.status.value}:{info.error_type or ''}"
            if case.errors:
                ok = info.status is TaskStatus.FAILURE and info.error_type in case.errors
                ok = ok and case.says in (info.error or "")
            else:
                result = http.get(f"/api/v1/status/{task_id}/result")
                ok = info.status is TaskStatus.SUCCESS and case.says in result.text
            if not ok:
                wrong.append((name, info.status.value, info.error_type, info.error))
        assert http.get("/health").status_code == 200
    tally = audit("hostile-files/api", store, list(accepted), records)
    report.record(tally, outcomes=outcomes)
    assert not wrong, wrong
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert worker.alive()


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


HOSTILE_REQUESTS = [
    ("id of 10,000 chars", "GET", "/api/v1/status/" + "a" * 10_000, None, None),
    ("id with traversal", "GET", "/api/v1/status/..%2F..%2Fetc%2Fpasswd", None, None),
    ("id with NUL", "GET", "/api/v1/status/abc%00def", None, None),
    ("id with RTL override", "DELETE", "/api/v1/ingest/%E2%80%AEtxt.exe", None, None),
    ("unknown id result", "GET", f"/api/v1/status/{uuid.uuid4()}/result", None, None),
    ("unknown batch", "GET", "/api/v1/batches/%2e%2e", None, None),
    ("url is a number", "POST", "/api/v1/ingest/url", {"url": 123}, None),
    ("url is a list", "POST", "/api/v1/ingest/url", {"url": ["https://a.example/"]}, None),
    ("url is null", "POST", "/api/v1/ingest/url", {"url": None}, None),
    ("body is null", "POST", "/api/v1/ingest/url", None, b"null"),
    ("body is a string", "POST", "/api/v1/ingest/url", None, b'"https://a.example/"'),
    ("metadata is a string", "POST", "/api/v1/ingest/url",
     {"url": "https://a.example/", "metadata": "x"}, None),
    ("options is a list", "POST", "/api/v1/ingest/url",
     {"url": "https://a.example/", "options": []}, None),
    ("unknown top-level field", "POST", "/api/v1/ingest/url",
     {"url": "https://a.example/", "callback": "https://b.example/"}, None),
    ("url of 9,000 chars", "POST", "/api/v1/ingest/url",
     {"url": "https://a.example/" + "a" * 9000}, None),
    ("metadata nested 100,000 deep", "POST", "/api/v1/ingest/url", None,
     b'{"url": "https://a.example/", "metadata": ' + _nested(100_000).encode() + b"}"),
    ("metadata of 100,000 keys", "POST", "/api/v1/ingest/url",
     {"url": "https://a.example/", "metadata": {f"k{i}": i for i in range(100_000)}}, None),
    ("batch of 10,000 items", "POST", "/api/v1/ingest/batch",
     {"items": [{"url": f"https://a.example/{i}"} for i in range(10_000)]}, None),
    ("batch of zero items", "POST", "/api/v1/ingest/batch", {"items": []}, None),
    ("invalid UTF-8 JSON", "POST", "/api/v1/ingest/url", None, b'{"url": "\xff\xfe"}'),
    ("list filter of the wrong type", "GET", "/api/v1/status/?limit=lots", None, None),
    ("negative page", "GET", "/api/v1/status/?offset=-5", None, None),
]  # fmt: skip


def test_hostile_requests_get_clear_4xx(api_process, report) -> None:
    base, api = api_process()
    outcomes, wrong = {}, []
    with httpx.Client(base_url=base, timeout=60) as http:
        for name, method, path, body, raw in HOSTILE_REQUESTS:
            headers = {"Content-Type": "application/json"} if body is not None or raw else {}
            content = raw if raw is not None else (json.dumps(body).encode() if body else None)
            response = http.request(method, path, content=content, headers=headers)
            outcomes[name] = response.status_code
            if not 400 <= response.status_code < 500:
                wrong.append((name, response.status_code, response.text[:300]))
                continue
            try:
                _error(response)
            except (AssertionError, ValueError) as exc:
                wrong.append((name, response.status_code, f"{exc}: {response.text[:300]}"))
        assert http.get("/health").status_code == 200
    report.record(Tally("hostile-api/requests"), outcomes=outcomes)
    assert not wrong, wrong
    assert api.alive()


FORBIDDEN_URLS = {
    "file": "file:///etc/passwd",
    "ftp": "ftp://127.0.0.1/",
    "127.0.0.1": "http://127.0.0.1:8000/",
    "[::1]": "http://[::1]:8000/",
    "localhost": "http://localhost:8000/",
    "0.0.0.0": "http://0.0.0.0/",
    "mapped-v4-loopback": "http://[::ffff:127.0.0.1]/",
    "metadata-169.254.169.254": "http://169.254.169.254/latest/meta-data/",
    "metadata-fd00:ec2::254": "http://[fd00:ec2::254]/",
    "10/8": "http://10.0.0.1/",
    "172.16/12": "http://172.16.5.4/",
    "192.168/16": "http://192.168.0.1/",
    "fc00::/7": "http://[fc00::1]/",
    "fec0::/10": "http://[fec0::1]/",
    "192.0.0/24": "http://192.0.0.9/",
    "NAT64 of 10.0.0.1": "http://[64:ff9b::a00:1]/",
    "invalid IDNA": "http://xn--zz.example/",
    "credentials": "http://user:pw@a.example/",
}


def test_forbidden_urls_are_refused_at_the_door(api_process, submitter, report) -> None:
    """With the SSRF allow-list empty, the API refuses these before queueing anything
    (syntax and literal addresses only: the API never resolves a name, so it sends nothing;
    names are the worker's to resolve, test_hostile_urls.py)."""
    base, _ = api_process(ssrf_allow="")
    outcomes, wrong = {}, []
    with httpx.Client(base_url=base, timeout=30) as http:
        for name, url in FORBIDDEN_URLS.items():
            for field in ("url", "webhook_url"):
                body = {"url": url} if field == "url" else {"url": "https://a.example/", field: url}
                response = http.post("/api/v1/ingest/url", json=body)
                outcomes[f"{name} as {field}"] = response.status_code
                if response.status_code != 422:
                    wrong.append((name, field, response.status_code, response.text[:200]))
                    continue
                error = _error(response)
                if error["code"] not in ("forbidden_target", "invalid_input"):
                    wrong.append((name, field, error))
    report.record(Tally("hostile-api/forbidden-urls"), outcomes=outcomes)
    assert not wrong, wrong
    assert submitter.store.list_ids() == []  # nothing was queued
