"""One real job per modality through a real worker, bad inputs ending as clear failures,
and cancellation inside a long processor loop."""

from __future__ import annotations

import http.server
import shutil
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from morag.core.config import settings
from morag.services.jobs import TaskStatus, get_job_store
from morag.services.task_manager import task_manager
from morag.tasks.base import (
    process_audio_task,
    process_document_task,
    process_video_task,
    process_web_task,
)
from tests.harness import wait_for
from tests.samples import SPEECH, make_docx, make_pdf, make_video

pytestmark = pytest.mark.usefixtures("isolated")


def run(job, timeout: float = 90):
    return wait_for(
        lambda: (i := task_manager.get_task_status(job.id)).status.is_final and i,
        timeout,
        f"job {job.id} to finish",
    )


def stages(task_id: str) -> list[str]:
    seen: list[str] = []
    for event in get_job_store(settings).history(task_id):
        if event["state"] == "progress" and (not seen or seen[-1] != event["stage"]):
            seen.append(event["stage"])
    return seen


@pytest.fixture(scope="module")
def page_server() -> Iterator[str]:
    """Article pages on 127.0.0.1 (the test settings allow this address)."""
    article = (
        "<html><head><title>Queues that keep jobs</title>"
        '<meta name="author" content="Ada Tester"></head><body><article>'
        "<h1>Queues that keep jobs</h1>"
        + "".join(
            f"<h2>Part {n}</h2><p>Paragraph {n} explains why acknowledging late keeps "
            f"every job when a worker dies, in plain words for readers.</p>"
            for n in range(1, 6)
        )
        + "</article></body></html>"
    ).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/broken":
                self.send_response(503)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(article)))
            self.end_headers()
            self.wfile.write(article)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def all_queues(workers):
    return workers.start(concurrency=2)


def test_document_job(all_queues, upload_dir: Path) -> None:
    path = make_docx(upload_dir / "report.docx")
    info = run(process_document_task.delay(file_path=str(path), metadata={"team": "ops"}))
    assert info.status is TaskStatus.SUCCESS, info.error
    result = get_job_store(settings).result(info.task_id)
    assert "# Quarterly Report" in result["markdown"] and "| North" in result["markdown"]
    assert result["chunks"] and result["chunks"][0]["metadata"]["heading_path"]
    assert stages(info.task_id)[0] == "validating" and "chunking" in stages(info.task_id)
    progress = [e["progress"] for e in get_job_store(settings).history(info.task_id)]
    assert progress == sorted(progress)


def test_pdf_pages_reach_the_chunks(all_queues, upload_dir: Path) -> None:
    path = make_pdf(upload_dir / "pages.pdf", pages=4)
    info = run(process_document_task.delay(file_path=str(path)))
    assert info.status is TaskStatus.SUCCESS, info.error
    result = get_job_store(settings).result(info.task_id)
    assert result["metadata"]["page_count"] == 4
    pages = {p for c in result["chunks"] for p in c["metadata"].get("pages", [])}
    assert pages == {1, 2, 3, 4}


def test_web_job(all_queues, page_server: str) -> None:
    info = run(process_web_task.delay(url=f"{page_server}/article"))
    assert info.status is TaskStatus.SUCCESS, info.error
    result = get_job_store(settings).result(info.task_id)
    assert result["metadata"]["title"] == "Queues that keep jobs"
    assert "Part 3" in result["markdown"]
    assert all(c["metadata"]["url"].startswith(page_server) for c in result["chunks"])


def test_audio_job(all_queues, upload_dir: Path) -> None:
    path = upload_dir / "speech.wav"
    shutil.copy(SPEECH, path)
    info = run(process_audio_task.delay(file_path=str(path)))
    assert info.status is TaskStatus.SUCCESS, info.error
    result = get_job_store(settings).result(info.task_id)
    assert "fox" in result["markdown"].lower()
    assert result["chunks"][0]["metadata"]["end"] > result["chunks"][0]["metadata"]["start"]
    assert "transcribing" in stages(info.task_id)


def test_video_job(all_queues, upload_dir: Path) -> None:
    path = make_video(upload_dir / "clip.mp4", seconds=6)
    info = run(process_video_task.delay(file_path=str(path)))
    assert info.status is TaskStatus.SUCCESS, info.error
    result = get_job_store(settings).result(info.task_id)
    assert len(result["artifacts"]) >= 2
    for artifact in result["artifacts"]:
        assert (settings.artifact_dir / artifact["path"]).is_file()
    assert result["metadata"]["has_audio"] is True


@pytest.mark.parametrize(
    ("name", "content", "error_type"),
    [
        ("empty.txt", b"", "InvalidInputError"),
        ("photo.pdf", b"\x89PNG\r\n\x1a\n" + bytes(200), "UnsupportedFormatError"),
        ("truncated.pdf", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog", "InvalidInputError"),
    ],
)
def test_bad_documents_fail_with_a_reason(
    all_queues, upload_dir: Path, name: str, content: bytes, error_type: str
) -> None:
    path = upload_dir / name
    path.write_bytes(content)
    info = run(process_document_task.delay(file_path=str(path)))
    assert info.status is TaskStatus.FAILURE
    assert info.error_type == error_type and info.attempts == 1, info.error
    assert "Traceback" not in info.error


def test_missing_file_fails_without_retry(all_queues, upload_dir: Path) -> None:
    # Refused URLs are proven in tests/reliability/test_hostile_urls.py, under a worker
    # that can reach nothing but loopback (no test here may risk a packet elsewhere).
    missing = run(process_document_task.delay(file_path=str(upload_dir / "nope.pdf")))
    assert missing.status is TaskStatus.FAILURE and "does not exist" in missing.error
    assert missing.attempts == 1


def test_server_errors_are_retried_then_fail(all_queues, page_server: str) -> None:
    info = run(process_web_task.delay(url=f"{page_server}/broken"))
    assert info.status is TaskStatus.FAILURE and info.error_type == "TransientError"
    assert info.attempts == settings.max_attempts


def test_cancel_during_transcription_stops_within_two_seconds(workers, upload_dir: Path) -> None:
    workers.start(queues="audio_processing", concurrency=1)
    long_audio = upload_dir / "long.wav"
    with wave.open(str(SPEECH)) as source:
        params, frames = source.getparams(), source.readframes(source.getnframes())
    with wave.open(str(long_audio), "wb") as target:
        target.setparams(params)
        for _ in range(40):  # ~2 minutes of speech
            target.writeframes(frames)
    job = process_audio_task.delay(file_path=str(long_audio))
    wait_for(lambda: "transcribing" in stages(job.id), 60, "transcription to start")
    asked = time.monotonic()
    task_manager.cancel(job.id)
    info = run(job, timeout=10)
    assert info.status is TaskStatus.REVOKED
    assert time.monotonic() - asked < 2.0
