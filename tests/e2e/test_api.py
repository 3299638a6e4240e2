"""The ingestion API over HTTP, against a real ``morag api`` process, real workers and the
real processors: every endpoint's success path and its error codes.

Most tests share one API process (``shared_api``); tests that need other settings (upload
limit, API keys, CORS) start their own through ``api_factory``. Jobs are left queued when
a test only needs their records, and a worker is started only when work must be done.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse

from tests.e2e.conftest import RunningApi
from tests.harness import ROOT, wait_for
from tests.samples import make_pdf, make_video

pytestmark = pytest.mark.usefixtures("isolated")

INGEST = "/api/v1/ingest"
STATUS = "/api/v1/status"
NEVER_ISSUED = "00000000-0000-4000-8000-000000000000"  # a well-formed id no job has

NOTES = (
    "# Field notes\n\nThe ingestion service keeps every job and reports each stage.\n\n"
    + "\n\n".join(
        f"## Section {i}\n\n"
        + " ".join(f"Sentence {i}.{j} about queues and workers." for j in range(12))
        for i in range(6)
    )
    + "\n"
)
PAGE = (
    "<!doctype html><html><head><title>Queue handbook</title></head><body><article>"
    "<h1>Queue handbook</h1>"
    + "".join(
        f"<p>Paragraph {i}: workers take jobs from their queue and report progress "
        f"until the job is done.</p>"
        for i in range(8)
    )
    + "</article></body></html>"
)


@pytest.fixture
def client(shared_api: RunningApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_api.url, timeout=15) as http:
        yield http


@pytest.fixture(scope="module")
def web_server() -> Iterator[str]:
    """A page on 127.0.0.1 (the test settings exempt loopback from the SSRF guard)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def upload(
    client: httpx.Client,
    content: bytes,
    name: str = "notes.md",
    headers: dict[str, str] | None = None,
    **fields: str,
) -> httpx.Response:
    return client.post(
        f"{INGEST}/file", files={"file": (name, content)}, data=fields, headers=headers
    )


def error_of(response: httpx.Response, status: int) -> dict:
    """The error body, after checking the status and the one error shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"])
    assert "Traceback" not in response.text
    return body["error"]


def wait_final(client: httpx.Client, task_id: str, timeout: float = 60) -> dict:
    def final() -> dict | None:
        body = client.get(f"{STATUS}/{task_id}").json()
        return body if body["status"] in ("success", "failure", "revoked") else None

    return wait_for(final, timeout, f"job {task_id} to finish", interval=0.1)


# --- documents: upload, follow, result ------------------------------------------------------


def test_document_job_end_to_end_with_live_events(
    shared_api: RunningApi, client: httpx.Client, workers
) -> None:
    """Upload, follow the SSE stream from before a worker exists until it closes at the
    end, then read status, paginated result and history."""
    response = upload(
        client,
        NOTES.encode(),
        metadata=json.dumps({"project": "handbook"}),
        chunk_size_tokens="32",
        chunk_overlap_tokens="0",
    )
    assert response.status_code == 202, response.text
    body = response.json()
    task_id = body["task_id"]
    assert body["status"] == "pending" and body["message"]
    assert response.headers["location"] == f"{STATUS}/{task_id}"

    events: list[tuple[str, dict]] = []
    with connect_sse(client, "GET", f"{STATUS}/{task_id}/events") as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        stream = source.iter_sse()
        first = next(stream)
        events.append((first.event, first.json()))
        assert first.event == "pending"  # replayed from the history: no worker yet
        workers.start(queues="document_processing")
        for sse in stream:  # live from the job's channel; ends when the server closes
            events.append((sse.event, sse.json()))
    names = [name for name, _ in events]
    stages = [data["stage"] for _, data in events]
    assert names[0] == "pending" and names[1] == "started" and names[-1] == "success"
    assert names.count("success") == 1
    for stage in ("validating", "converting", "chunking", "finalising"):
        assert stage in stages, stages
    assert all(data["task_id"] == task_id for _, data in events)
    timestamps = [data["ts"] for _, data in events]
    assert timestamps == sorted(timestamps) and len(set(timestamps)) == len(timestamps)

    status = client.get(f"{STATUS}/{task_id}").json()
    assert status["status"] == "success" and status["progress"] == 1.0
    assert status["kind"] == "document" and status["attempts"] == 1
    assert status["metadata"] == {"project": "handbook", "filename": "notes.md"}
    assert status["created_at"] <= status["started_at"] <= status["finished_at"]
    assert status["result"]["chunk_count"] > 3 and status["result"]["title"] == "Field notes"

    total = status["result"]["chunk_count"]
    page = client.get(f"{STATUS}/{task_id}/result", params={"offset": 1, "limit": 2}).json()
    assert page["total_chunks"] == total and [c["index"] for c in page["chunks"]] == [1, 2]
    assert page["next_offset"] == 3 and page["markdown"].startswith("# Field notes")
    assert all(c["tokens"] <= 32 for c in page["chunks"])
    last = client.get(
        f"{STATUS}/{task_id}/result", params={"offset": total - 1, "include_markdown": "false"}
    ).json()
    assert last["next_offset"] is None and last["markdown"] is None and len(last["chunks"]) == 1

    history = client.get(f"{STATUS}/{task_id}/history").json()["events"]
    assert [e["state"] for e in history][-1] == "success"
    assert len(history) == len(events)  # the stream held every event exactly once

    # Following a finished job replays its history and closes.
    with connect_sse(client, "GET", f"{STATUS}/{task_id}/events") as source:
        replayed = [sse.event for sse in source.iter_sse()]
    assert replayed == names
    # Last-Event-ID resumes after an event.
    with connect_sse(
        client, "GET", f"{STATUS}/{task_id}/events", headers={"Last-Event-ID": events[-2][1]["ts"]}
    ) as source:
        assert [sse.event for sse in source.iter_sse()] == ["success"]

    assert f"task_id={task_id}" in shared_api.log()  # request lines carry the task id


def test_many_followers_of_one_job_all_see_its_end(client: httpx.Client) -> None:
    """Each follower subscribes before reading the history, so a change right after they
    connect reaches all of them exactly once, and every stream closes at the final state."""
    task_id = upload(client, b"# Followed\n").json()["task_id"]
    followers = 20
    connected = threading.Barrier(followers + 1, timeout=30)
    seen: list[list[str]] = []

    def follow() -> None:
        with (
            httpx.Client(base_url=str(client.base_url), timeout=30) as own,
            connect_sse(own, "GET", f"{STATUS}/{task_id}/events") as source,
        ):
            names = []
            for sse in source.iter_sse():
                names.append(sse.event)
                if len(names) == 1:
                    connected.wait()
            seen.append(names)

    threads = [threading.Thread(target=follow) for _ in range(followers)]
    for thread in threads:
        thread.start()
    connected.wait()  # every follower has its first event: all are subscribed
    assert client.delete(f"{INGEST}/{task_id}").json()["outcome"] == "revoked"
    for thread in threads:
        thread.join(30)
    assert seen == [["pending", "revoked"]] * followers


def test_result_history_and_events_of_unknown_or_unfinished_jobs(client: httpx.Client) -> None:
    for path in ("", "/result", "/history", "/events"):
        error = error_of(client.get(f"{STATUS}/{NEVER_ISSUED}{path}"), 404)
        assert error["code"] == "not_found"
    task_id = upload(client, b"# Pending\n\nno worker runs it\n").json()["task_id"]
    error = error_of(client.get(f"{STATUS}/{task_id}/result"), 409)
    assert error["details"]["status"] == "pending" and "wait" in error["message"]
    error = error_of(client.get(f"{STATUS}/{task_id}/result", params={"limit": 0}), 422)
    assert error["details"]["errors"][0]["field"] == "query.limit"


# --- uploads: type, names, limits ----------------------------------------------------------


def raw_upload(client: httpx.Client, filename: bytes, content: bytes) -> httpx.Response:
    """A hand-made multipart body (httpx would percent-encode odd bytes in the name)."""
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\nContent-Type: text/plain\r\n\r\n'
        + content
        + b"\r\n--XyZ--\r\n"
    )
    return client.post(
        f"{INGEST}/file",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
    )


def test_upload_is_stored_under_a_generated_name(client: httpx.Client, upload_dir: Path) -> None:
    for sent, kept, content in [
        (b"../../etc/pass\x00wd.txt", "passwd.txt", b"plain words\n"),
        (b"C:\\Users\\me\\notes.MD", "notes.MD", b"# Notes\n"),
        (b"..", "", b"dots\n"),
    ]:
        before = set(upload_dir.iterdir())
        response = raw_upload(client, sent, content)
        assert response.status_code == 202, response.text
        status = client.get(f"{STATUS}/{response.json()['task_id']}").json()
        assert status["metadata"].get("filename", "") == kept
        (stored,) = set(upload_dir.iterdir()) - before
        assert stored.parent == upload_dir and len(stored.name.split(".")[0]) == 32
        assert stored.suffix == Path(kept).suffix.lower() and stored.read_bytes() == content


def test_type_is_detected_from_content(client: httpx.Client) -> None:
    speech = (ROOT / "tests" / "fixtures" / "speech.wav").read_bytes()
    audio = upload(client, speech, name="recording.bin")  # the name says nothing
    assert audio.status_code == 202, audio.text
    info = client.get(f"{STATUS}/{audio.json()['task_id']}").json()
    assert info["kind"] == "audio" and info["queue"] == "audio_processing"
    html = upload(client, PAGE.encode(), name="page")
    assert client.get(f"{STATUS}/{html.json()['task_id']}").json()["kind"] == "document"


def test_upload_refusals(client: httpx.Client, upload_dir: Path) -> None:
    before = set(upload_dir.iterdir())
    assert "empty" in error_of(upload(client, b""), 422)["message"]
    error = error_of(upload(client, b"\x00\x01\x02\xff" * 64, name="blob.bin"), 415)
    assert error["code"] == "unsupported_format"
    error = error_of(upload(client, b"just text", source_type="audio"), 415)
    assert "not an audio or video file" in error["message"]
    speech = (ROOT / "tests" / "fixtures" / "speech.wav").read_bytes()
    error = error_of(upload(client, speech, source_type="document"), 415)
    assert "audio" in error["message"]
    error = error_of(upload(client, b"text", source_type="spreadsheet"), 422)
    assert error["details"]["errors"][0]["field"] == "source_type"
    error = error_of(upload(client, b"text", colour="blue"), 422)
    assert error["details"]["errors"][0]["field"] == "colour"
    error = error_of(upload(client, b"text", metadata="{not json"), 422)
    assert error["details"]["field"] == "metadata"
    error = error_of(upload(client, b"text", metadata="[1, 2]"), 422)
    assert "JSON object" in error["message"]
    error = error_of(upload(client, b"text", metadata=json.dumps({"x": "y" * 70_000})), 413)
    assert error["code"] == "limit_exceeded"
    error = error_of(
        upload(client, b"text", chunk_size_tokens="64", chunk_overlap_tokens="64"), 422
    )
    assert "chunk_overlap_tokens" in error["message"]
    error = error_of(upload(client, b"text", webhook_url="http://169.254.169.254/hook"), 422)
    assert error["code"] == "forbidden_target" and error["details"]["field"] == "webhook_url"
    error = error_of(upload(client, b"text", webhook_url="ftp://example.com/hook"), 422)
    assert "scheme" in error["message"]
    error = error_of(
        client.post(f"{INGEST}/file", data={"metadata": "{}"}, files={"other": ("a.txt", b"x")}),
        422,
    )
    assert error["details"]["field"] == "file"
    error = error_of(client.post(f"{INGEST}/file", json={"file": "x"}), 415)
    assert "multipart/form-data" in error["message"]
    assert set(upload_dir.iterdir()) == before  # nothing refused was kept


def test_upload_over_the_size_limit(api_factory, upload_dir: Path) -> None:
    api = api_factory.start(max_upload_bytes="1024")
    before = set(upload_dir.iterdir())
    with httpx.Client(base_url=api.url, timeout=30) as http:
        assert upload(http, b"a" * 1024, name="fits.txt").status_code == 202
        # Over the cap, with a Content-Length: refused before the body is read.
        error = error_of(upload(http, b"a" * 5_000_000, name="big.txt"), 413)
        assert error["details"]["max_bytes"] < 5_000_000
        # Just over the cap: the stream is cut at the limit.
        error = error_of(upload(http, b"a" * 1025, name="big.txt"), 413)
        assert "1024 bytes" in error["message"]

        # Without a Content-Length (chunked): counted while streaming.
        def chunked() -> Iterator[bytes]:
            yield (b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.txt"\r\n\r\n')
            for _ in range(50):
                yield b"a" * 10_000
            yield b"\r\n--b--\r\n"

        response = http.post(
            f"{INGEST}/file",
            content=chunked(),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        )
        error_of(response, 413)
    added = set(upload_dir.iterdir()) - before
    assert len(added) == 1 and next(iter(added)).read_bytes() == b"a" * 1024  # no partials


# --- URLs ----------------------------------------------------------------------------------


def test_url_job_runs_and_bad_urls_are_refused(
    client: httpx.Client, workers, web_server: str
) -> None:
    response = client.post(
        f"{INGEST}/url",
        json={
            "url": f"{web_server}/handbook",
            "metadata": {"source": "test"},
            "options": {"chunk_size_tokens": 64, "chunk_overlap_tokens": 8},
        },
    )
    assert response.status_code == 202, response.text
    task_id = response.json()["task_id"]
    assert response.headers["location"] == f"{STATUS}/{task_id}"
    workers.start(queues="web_processing")
    final = wait_final(client, task_id)
    assert final["status"] == "success", final["error"]
    assert final["kind"] == "web" and final["metadata"] == {"source": "test"}
    result = client.get(f"{STATUS}/{task_id}/result").json()
    assert "Paragraph 3" in result["markdown"] and result["total_chunks"] >= 1

    refusals = [
        ({"url": "http://169.254.169.254/latest"}, 422, "forbidden_target"),
        ({"url": "http://10.1.2.3/"}, 422, "forbidden_target"),
        ({"url": "file:///etc/passwd"}, 422, "forbidden_target"),
        ({"url": ""}, 422, "invalid_input"),
        ({"url": "https://"}, 422, "invalid_input"),
        ({"url": "https://example.com/", "colour": "blue"}, 422, "invalid_input"),
        ({"url": "https://example.com/", "metadata": [1]}, 422, "invalid_input"),
        (
            {"url": "https://example.com/", "options": {"chunk_size_tokens": 4}},
            422,
            "invalid_input",
        ),
        ({"url": "http://10.1.2.3/talk.mp3", "source_type": "audio"}, 422, "forbidden_target"),
        ({"url": "https://example.com/", "metadata": {"x": "y" * 70_000}}, 413, "limit_exceeded"),
    ]
    for body, status, code in refusals:
        error = error_of(client.post(f"{INGEST}/url", json=body), status)
        assert error["code"] == code, (body, error)
    error = error_of(
        client.post(f"{INGEST}/url", json={"url": "https://example.com/", "colour": "blue"}), 422
    )
    assert error["details"]["errors"][0]["field"] == "colour"
    error = error_of(
        client.post(f"{INGEST}/url", content=b"{", headers={"Content-Type": "application/json"}),
        422,
    )
    error = error_of(client.post(f"{INGEST}/url", json={"url": "http://10.0.0.1/"}), 422)
    assert "private" in error["message"] and error["details"]["field"] == "url"


def test_url_submissions_answer_alike_on_the_fast_path_and_the_route(
    client: httpx.Client,
) -> None:
    """Plain URL submissions skip FastAPI's routing (UrlSubmissionFastPath); the answers
    are the route's: the same fields, headers, dedupe and stored record."""
    fast = client.post(f"{INGEST}/url", json={"url": "https://example.com/alike"})
    routed = client.post(  # an Idempotency-Key takes the route
        f"{INGEST}/url",
        json={"url": "https://example.com/alike-2"},
        headers={"Idempotency-Key": "k"},
    )
    for response in (fast, routed):
        assert response.status_code == 202, response.text
        body = response.json()
        assert set(body) == {"task_id", "status", "message"} and body["status"] == "pending"
        assert response.headers["location"] == f"{STATUS}/{body['task_id']}"
        assert response.headers["content-type"] == "application/json"
    assert fast.json()["message"] == routed.json()["message"] == "queued for processing"
    joined = client.post(f"{INGEST}/url", json={"url": "https://EXAMPLE.com/alike"})
    assert joined.json()["task_id"] == fast.json()["task_id"]
    assert "already queued" in joined.json()["message"]
    record = client.get(f"{STATUS}/{fast.json()['task_id']}").json()
    assert record["kind"] == "web" and record["metadata"] == {}
    # A body the fast path does not take (form-encoded) reaches the route, read once.
    form = client.post(f"{INGEST}/url", data={"url": "https://example.com/form"})
    assert error_of(form, 422)["code"] == "invalid_input"


# --- idempotency and dedupe ----------------------------------------------------------------


def test_idempotency_key_returns_the_original_job(client: httpx.Client) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = client.post(f"{INGEST}/url", json={"url": "https://example.com/a"}, headers=key)
    again = client.post(f"{INGEST}/url", json={"url": "https://example.com/a"}, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    error = error_of(
        client.post(f"{INGEST}/url", json={"url": "https://example.com/b"}, headers=key), 422
    )
    assert "Idempotency-Key" in error["message"]

    up1 = upload(client, b"# Same\n", headers={"Idempotency-Key": "upload-1"})
    up2 = upload(client, b"# Same\n", headers={"Idempotency-Key": "upload-1"})
    assert up1.json()["task_id"] == up2.json()["task_id"]
    error_of(
        client.post(
            f"{INGEST}/url", json={"url": "https://example.com/"}, headers={"Idempotency-Key": ""}
        ),
        422,
    )


def test_identical_content_joins_the_queued_job(client: httpx.Client, upload_dir: Path) -> None:
    first = upload(client, b"# Shared\n\nsame bytes\n", name="a.md").json()["task_id"]
    files_after_first = set(upload_dir.iterdir())
    second = upload(client, b"# Shared\n\nsame bytes\n", name="b.md")
    assert second.status_code == 202 and second.json()["task_id"] == first
    assert "already queued" in second.json()["message"]
    assert set(upload_dir.iterdir()) == files_after_first  # the duplicate was not kept
    # Other options are other work.
    other = upload(client, b"# Shared\n\nsame bytes\n", chunk_size_tokens="128")
    assert other.json()["task_id"] != first

    url_job = client.post(f"{INGEST}/url", json={"url": "HTTPS://Example.com:443/x#top"})
    same = client.post(f"{INGEST}/url", json={"url": "https://example.com/x"})
    assert url_job.json()["task_id"] == same.json()["task_id"]

    # Once the job is cancelled, the same content is new work again.
    assert client.delete(f"{INGEST}/{first}").status_code == 202
    again = upload(client, b"# Shared\n\nsame bytes\n", name="a.md").json()["task_id"]
    assert again != first


# --- batches -------------------------------------------------------------------------------


def test_batches_of_files_and_urls(client: httpx.Client, workers, web_server: str) -> None:
    multipart = client.post(
        f"{INGEST}/batch",
        files=[
            ("files", ("one.md", b"# One\n\nfirst file\n")),
            ("files", ("two.txt", b"second file\n")),
        ],
        data={
            "items": json.dumps([{"url": f"{web_server}/page"}]),
            "metadata": json.dumps({"batch": "mixed"}),
        },
    )
    assert multipart.status_code == 202, multipart.text
    batch = multipart.json()
    assert len(batch["task_ids"]) == 3
    assert multipart.headers["location"] == f"/api/v1/batches/{batch['batch_id']}"

    state = client.get(f"/api/v1/batches/{batch['batch_id']}").json()
    assert state["total"] == 3 and state["counts"]["pending"] == 3
    assert state["finished"] == 0 and not state["done"] and state["progress"] == 0
    member = client.get(f"{STATUS}/{batch['task_ids'][0]}").json()
    assert member["batch_id"] == batch["batch_id"]
    assert member["metadata"] == {"batch": "mixed", "filename": "one.md"}

    workers.start(queues="document_processing,web_processing")

    def done() -> dict | None:
        body = client.get(f"/api/v1/batches/{batch['batch_id']}").json()
        return body if body["done"] else None

    state = wait_for(done, 60, "the batch to finish", interval=0.1)
    assert state["counts"]["success"] == 3 and state["progress"] == 1.0, state

    as_json = client.post(
        f"{INGEST}/batch",
        json={
            "items": [{"url": f"{web_server}/1"}, {"url": f"{web_server}/2", "source_type": "web"}]
        },
    )
    assert as_json.status_code == 202 and len(as_json.json()["task_ids"]) == 2


def test_batch_refusals(client: httpx.Client) -> None:
    too_many = [{"url": f"https://example.com/{i}"} for i in range(101)]
    error = error_of(client.post(f"{INGEST}/batch", json={"items": too_many}), 413)
    assert error["details"]["max_items"] == 100
    error = error_of(
        client.post(
            f"{INGEST}/batch",
            json={"items": [{"url": "https://example.com/"}, {"url": "http://169.254.169.254/"}]},
        ),
        422,
    )
    assert error["details"]["field"] == "items.1.url"
    error = error_of(client.post(f"{INGEST}/batch", json={"items": []}), 422)
    error = error_of(client.post(f"{INGEST}/batch", json={"items": [{"uri": "x"}]}), 422)
    assert {e["field"] for e in error["details"]["errors"]} == {"items.0.url", "items.0.uri"}
    error = error_of(
        client.post(
            f"{INGEST}/batch",
            files=[("files", ("ok.md", b"# fine\n")), ("files", ("empty.md", b""))],
        ),
        422,
    )
    assert error["details"]["file"] == "empty.md"
    error_of(
        client.post(f"{INGEST}/batch", content=b"x", headers={"Content-Type": "text/plain"}), 415
    )
    error_of(client.get(f"/api/v1/batches/{NEVER_ISSUED}"), 404)
    assert client.get(f"{STATUS}/").json()["items"] == []  # nothing was queued


# --- cancel and retry ----------------------------------------------------------------------


def test_cancel_and_retry(client: httpx.Client, workers) -> None:
    queued = upload(client, b"# To cancel\n").json()["task_id"]
    cancel = client.delete(f"{INGEST}/{queued}")
    assert cancel.status_code == 202, cancel.text
    assert cancel.json()["outcome"] == "revoked" and cancel.json()["status"] == "revoked"
    assert error_of(client.delete(f"{INGEST}/{queued}"), 409)["details"]["status"] == "revoked"
    assert error_of(client.delete(f"{INGEST}/{NEVER_ISSUED}"), 404)["code"] == "not_found"
    resubmitted = upload(client, b"# To cancel\n").json()["task_id"]  # new work, queued
    assert resubmitted != queued

    retried = client.post(f"{INGEST}/{queued}/retry")
    assert retried.status_code == 202, retried.text
    new_id = retried.json()["task_id"]
    assert new_id != queued and retried.json()["retry_of"] == queued
    assert retried.headers["location"] == f"{STATUS}/{new_id}"
    error = error_of(client.post(f"{INGEST}/{queued}/retry"), 409)
    assert error["details"]["retried_by"] == new_id
    error = error_of(client.post(f"{INGEST}/{new_id}/retry"), 409)  # pending: nothing to retry
    assert error["details"]["status"] == "pending"
    # The retry is the job doing that work now: the same content joins it.
    assert client.get(f"{STATUS}/{new_id}").json()["status"] == "pending"
    assert upload(client, b"# To cancel\n").json()["task_id"] == new_id
    error_of(client.post(f"{INGEST}/{NEVER_ISSUED}/retry"), 404)

    # A job that fails (a PDF header on a body that is no PDF), retried with its input.
    broken = upload(
        client,
        b"%PDF-1.4\nthis is not really a pdf\n",
        name="broken.pdf",
        metadata=json.dumps({"n": 1}),
        chunk_size_tokens="100",
    ).json()["task_id"]
    # inputs kept with the record, so the failed job can be retried (see the next test)
    workers.start(queues="document_processing", keep_inputs_until_expiry="true")
    failed = wait_final(client, broken)
    assert failed["status"] == "failure" and failed["error"]["message"]
    assert wait_final(client, new_id)["status"] == "success"  # the retried cancelled job ran

    again = client.post(f"{INGEST}/{broken}/retry", headers={"Idempotency-Key": "r1"})
    replay = client.post(f"{INGEST}/{broken}/retry", headers={"Idempotency-Key": "r1"})
    assert again.status_code == replay.status_code == 202
    assert replay.json()["task_id"] == again.json()["task_id"]
    second = wait_final(client, again.json()["task_id"])
    assert second["retry_of"] == broken and second["status"] == "failure"
    assert second["metadata"] == failed["metadata"] == {"n": 1, "filename": "broken.pdf"}


def test_retry_after_the_input_was_deleted_is_a_clear_410(
    client: httpx.Client, workers, upload_dir: Path
) -> None:
    before = set(upload_dir.iterdir())
    broken = upload(client, b"%PDF-1.4\nnot a pdf either\n", name="b.pdf").json()["task_id"]
    (stored,) = set(upload_dir.iterdir()) - before
    workers.start(queues="document_processing")
    assert wait_final(client, broken)["status"] == "failure"
    wait_for(lambda: not stored.exists(), 30, "the failed job's upload to be deleted")
    error = error_of(client.post(f"{INGEST}/{broken}/retry"), 410)
    assert error["code"] == "input_gone" and error["details"]["reason"] == "input_deleted"
    assert "deleted when the job finished" in error["message"]
    assert "MORAG_KEEP_INPUTS_UNTIL_EXPIRY" in error["message"]


def test_cancelling_a_running_job(client: httpx.Client, workers, tmp_path: Path) -> None:
    """A long PDF (progress on every page): cancelled while converting, it stops early."""
    pdf = make_pdf(tmp_path / "long.pdf", pages=4000).read_bytes()
    task_id = upload(client, pdf, name="long.pdf").json()["task_id"]
    workers.start(queues="document_processing")

    def converting() -> bool:
        body = client.get(f"{STATUS}/{task_id}").json()
        assert body["status"] not in ("success", "failure"), body
        return body["stage"] == "converting"

    wait_for(converting, 60, "the job to be converting pages", interval=0.02)
    cancel = client.delete(f"{INGEST}/{task_id}")
    assert cancel.status_code == 202 and cancel.json()["outcome"] == "cancelling", cancel.text
    final = wait_final(client, task_id, timeout=15)
    assert final["status"] == "revoked" and final["progress"] < 0.85, final
    error_of(client.get(f"{STATUS}/{task_id}/result"), 409)


# --- listing and stats ---------------------------------------------------------------------


def test_job_list_filters_and_pages(client: httpx.Client) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    docs = [upload(client, f"# Doc {i}\n".encode()).json()["task_id"] for i in range(3)]
    web = client.post(f"{INGEST}/url", json={"url": "https://example.com/list"}).json()
    client.delete(f"{INGEST}/{docs[0]}")

    listed = client.get(f"{STATUS}/").json()
    assert [j["task_id"] for j in listed["items"]] == [web["task_id"], *reversed(docs)]
    assert listed["next_offset"] is None
    by_state = client.get(f"{STATUS}/", params={"state": "revoked"}).json()["items"]
    assert [j["task_id"] for j in by_state] == [docs[0]]
    both = client.get(f"{STATUS}/", params=[("state", "revoked"), ("state", "pending")])
    assert len(both.json()["items"]) == 4
    by_kind = client.get(f"{STATUS}/", params={"kind": "web"}).json()["items"]
    assert [j["task_id"] for j in by_kind] == [web["task_id"]]
    pending_docs = client.get(
        f"{STATUS}/", params={"kind": "document", "state": "pending", "limit": 1}
    ).json()
    assert [j["task_id"] for j in pending_docs["items"]] == [docs[2]]
    assert pending_docs["next_offset"] == 1
    rest = client.get(
        f"{STATUS}/", params={"kind": "document", "state": "pending", "limit": 1, "offset": 1}
    ).json()
    assert [j["task_id"] for j in rest["items"]] == [docs[1]] and rest["next_offset"] is None
    page = client.get(f"{STATUS}/", params={"limit": 2, "offset": 2}).json()
    assert [j["task_id"] for j in page["items"]] == [docs[1], docs[0]]

    after = datetime.now(UTC) + timedelta(seconds=1)
    assert (
        client.get(f"{STATUS}/", params={"created_after": after.isoformat()}).json()["items"] == []
    )
    window = client.get(
        f"{STATUS}/",
        params={"created_after": before.isoformat(), "created_before": after.isoformat()},
    ).json()
    assert len(window["items"]) == 4
    error = error_of(client.get(f"{STATUS}/", params={"state": "sleeping"}), 422)
    assert error["details"]["errors"][0]["field"] == "query.state.0"
    error_of(client.get(f"{STATUS}/", params={"created_after": "yesterday"}), 422)


def test_queue_stats(client: httpx.Client, workers) -> None:
    upload(client, b"# waiting\n")
    stats = client.get(f"{STATUS}/stats/queues").json()
    assert stats["queues"]["document_processing"]["pending"] == 1
    assert stats["pending_total"] == 1 and stats["workers"] == []
    workers.start(queues="web_processing")
    stats = client.get(f"{STATUS}/stats/queues").json()
    assert stats["queues"]["web_processing"]["consumers"] == 1
    assert stats["queues"]["document_processing"]["consumers"] == 0


# --- auth, CORS, errors, OpenAPI -----------------------------------------------------------


def test_api_keys(api_factory) -> None:
    api = api_factory.start(api_keys="one:key-one-secret,two:key-two-secret")
    with httpx.Client(base_url=api.url, timeout=15) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/health/ready").status_code in (200, 503)  # not 401
        missing = http.get(f"{STATUS}/")
        error = error_of(missing, 401)
        assert error["code"] == "unauthorized" and "X-API-Key" in error["message"]
        assert missing.headers["www-authenticate"].startswith("Bearer")
        error_of(http.get(f"{STATUS}/", headers={"X-API-Key": "key-three-secret"}), 401)
        error_of(http.get(f"{STATUS}/", headers={"Authorization": "Basic a2V5LW9uZQ=="}), 401)
        error_of(upload(http, b"# secret\n"), 401)
        error_of(http.post(f"{INGEST}/url", json={"url": "https://example.com/k"}), 401)
        url_job = http.post(
            f"{INGEST}/url",
            json={"url": "https://example.com/k"},
            headers={"X-API-Key": "key-one-secret"},
        )
        assert url_job.status_code == 202, url_job.text
        error_of(http.get(f"{STATUS}/stats/queues"), 401)
        error_of(http.get("/api/v1/batches/x"), 401)
        assert (
            http.get(f"{STATUS}/", headers={"Authorization": "Bearer key-one-secret"}).status_code
            == 200
        )
        accepted = upload(http, b"# secret\n", headers={"X-API-Key": "key-two-secret"})
        assert accepted.status_code == 202
        job = f"{STATUS}/{accepted.json()['task_id']}"
        own = http.get(job, headers={"authorization": "bearer key-two-secret"})
        assert own.json()["status"] == "pending" and own.json()["owner"] == "two"
        # Another key's job is unknown to this one (the route's fast path answers as well).
        assert http.get(job, headers={"X-API-Key": "key-one-secret"}).status_code == 404
        for refused in (
            {},
            {"X-API-Key": "key-three-secret"},
            {"Authorization": "Basic a2V5LW9uZQ=="},
            {"Authorization": "Bearer", "X-API-Key": ""},
        ):
            error = error_of(http.get(job, headers=refused), 401)
            assert error["code"] == "unauthorized"


def test_without_api_keys_no_key_is_needed(client: httpx.Client) -> None:
    assert client.get(f"{STATUS}/").status_code == 200
    assert client.get(f"{STATUS}/", headers={"X-API-Key": "anything"}).status_code == 200


def test_cors(api_factory, client: httpx.Client) -> None:
    api = api_factory.start(cors_origins="https://app.example")
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "idempotency-key,content-type",
    }
    with httpx.Client(base_url=api.url, timeout=15) as http:
        response = http.options(f"{INGEST}/url", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        listed = http.get(f"{STATUS}/", headers={"Origin": "https://app.example"})
        assert listed.headers["access-control-allow-origin"] == "https://app.example"
        other = http.get(f"{STATUS}/", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    # Without cors_origins no cross-origin access is granted.
    plain = client.get(f"{STATUS}/", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in plain.headers


def test_every_error_has_the_one_shape(client: httpx.Client) -> None:
    error_of(client.get("/api/v1/nowhere"), 404)
    assert error_of(client.put(f"{INGEST}/url"), 405)["code"] == "method_not_allowed"
    error = error_of(
        client.post(
            f"{INGEST}/url", content=b"[" * 100_000, headers={"Content-Type": "application/json"}
        ),
        422,
    )
    assert error["code"] == "invalid_input"
    huge = {"url": "https://example.com/", "metadata": {"x": "y" * 20_000_000}}
    error_of(client.post(f"{INGEST}/url", json=huge), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield b'{"url": "https://example.com/", "metadata": {"x": "'
        for _ in range(40):
            yield b"y" * 500_000
        yield b'"}}'

    streamed = client.post(
        f"{INGEST}/url", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert error_of(streamed, 413)["code"] == "limit_exceeded"


def test_openapi_describes_every_endpoint(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    expected = {
        ("post", "/api/v1/ingest/file"),
        ("post", "/api/v1/ingest/url"),
        ("post", "/api/v1/ingest/batch"),
        ("delete", "/api/v1/ingest/{task_id}"),
        ("post", "/api/v1/ingest/{task_id}/retry"),
        ("get", "/api/v1/status/"),
        ("get", "/api/v1/status/stats/queues"),
        ("get", "/api/v1/status/{task_id}"),
        ("get", "/api/v1/status/{task_id}/result"),
        ("get", "/api/v1/status/{task_id}/history"),
        ("get", "/api/v1/status/{task_id}/events"),
        ("get", "/api/v1/status/{task_id}/artifacts/{name}"),
        ("get", "/api/v1/batches/{batch_id}"),
    }
    operations = {
        (method, path): op for path, item in spec["paths"].items() for method, op in item.items()
    }
    assert expected <= set(operations)
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for key in expected:
        op = operations[key]
        assert {"bearer": []} in op["security"] and {"apiKey": []} in op["security"], key
        assert {"401", "500"} <= set(op["responses"]), key
        for code, response in op["responses"].items():
            if code >= "400":
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (key, code)
        if op.get("parameters") or op.get("requestBody"):
            assert "422" in op["responses"], key
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert (
        "multipart/form-data"
        in operations[("post", "/api/v1/ingest/file")]["requestBody"]["content"]
    )
    batch_body = operations[("post", "/api/v1/ingest/batch")]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(batch_body)
    assert (
        "text/event-stream"
        in operations[("get", "/api/v1/status/{task_id}/events")]["responses"]["200"]["content"]
    )
    assert "security" not in operations[("get", "/health")]


def test_video_keyframes_are_served_as_artifacts(
    client: httpx.Client, workers, tmp_path: Path
) -> None:
    workers.start(queues="video_processing")
    video = make_video(tmp_path / "clip.mp4", seconds=4, audio_codec=None)
    accepted = upload(client, video.read_bytes(), name="clip.mp4", source_type="video")
    assert accepted.status_code == 202, accepted.text
    task_id = accepted.json()["task_id"]
    assert wait_final(client, task_id)["status"] == "success"
    artifacts = client.get(f"{STATUS}/{task_id}/result").json()["artifacts"]
    assert len(artifacts) >= 2
    image = client.get(f"{STATUS}/{task_id}/artifacts/{artifacts[0]['name']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content[:2] == b"\xff\xd8"  # a JPEG
    missing = client.get(f"{STATUS}/{task_id}/artifacts/nope.jpg")
    assert error_of(missing, 404)["code"] == "not_found"
    traversal = client.get(f"{STATUS}/{task_id}/artifacts/..%2F..%2Fetc%2Fpasswd")
    assert traversal.status_code == 404
