"""``morag ingest|status|cancel|jobs`` as subprocesses against a real API and worker.

Everything runs on 127.0.0.1: the API (``api_server``), workers, a page server for URL
ingestion and a webhook receiver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from morag.client import MoragClient
from tests.harness import ROOT, free_port, serve_page
from tests.webhook_receiver import SECRET, receivers

NOTES = "# Field notes\n\nThe queue keeps every job.\n\n## Details\n\nNothing is lost.\n"
PAGE = (
    b"<html><head><title>Release notes</title></head><body><article><h1>Release notes</h1>"
    + b"<p>The ingestion service turns pages into Markdown and chunks for retrieval.</p>" * 20
    + b"</article></body></html>"
)


def morag(api: str, *args: str, timeout: float = 90, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m morag.cli`` with the API's URL in the environment."""
    return subprocess.run(
        [sys.executable, "-m", "morag.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "MORAG_API_URL": api, "COLUMNS": "200", **env},
        check=False,
    )


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    path = tmp_path / "field-notes.md"
    path.write_text(NOTES)
    return path


@pytest.fixture
def page_server() -> Iterator[str]:
    with serve_page(PAGE) as base:
        yield base


def test_ingest_file_waits_with_live_progress_and_sends_the_webhook(
    api_server: str, workers, notes: Path
) -> None:
    workers.start(queues="document_processing,celery", webhook_secret=SECRET)
    with receivers() as make:
        hook = make()
        run = morag(
            api_server,
            "ingest",
            str(notes),
            "--wait",
            "--metadata",
            '{"team": "docs"}',
            "--webhook-url",
            hook.url(),
        )
        print(run.stderr, run.stdout, sep="\n")  # shown with -s: what a user sees
        assert run.returncode == 0, run.stdout + run.stderr
        task_id = run.stderr.split("submitted ", 1)[1].split(";")[0]
        assert f"done: {task_id}" in run.stdout
        assert "status: success" in run.stdout and "progress: 100%" in run.stdout
        assert "chunk_count:" in run.stdout
        # progress lines came from the job's event stream, in order, ending at success
        lines = [line for line in run.stderr.splitlines() if "%" in line]
        stages = [line.split("%", 1)[1].split(":")[0].strip() for line in lines]
        assert stages[-1] == "success", run.stderr
        assert "started" in stages and stages.index("started") < len(stages) - 1, run.stderr
        assert lines[-1].strip().startswith("100%")

        # the output ends with the document the job indexed; its webhook names it too
        last = run.stdout.strip().splitlines()[-1]
        assert last.startswith("document: doc_"), run.stdout
        document_id = last.split(": ", 1)[1]

        [request] = hook.wait_requests(1)
        event = Webhook(SECRET).verify(request.body, request.headers)
        assert event["type"] == "job.succeeded" and event["data"]["task_id"] == task_id
        assert event["data"]["result"]["document_id"] == document_id

    found = morag(api_server, "search", "does the queue lose work?", "-k", "3")
    assert found.returncode == 0, found.stdout + found.stderr
    assert "SCORE" in found.stdout and "field-notes.md" in found.stdout, found.stdout
    assert "Field notes" in found.stdout  # the hit's heading path
    found = morag(api_server, "search", "does the queue lose work?", "--json")
    assert json.loads(found.stdout)["hits"][0]["document_id"] == document_id

    shown = morag(api_server, "status", task_id, "--json")
    assert shown.returncode == 0, shown.stderr
    job = json.loads(shown.stdout)
    assert job["status"] == "success" and job["metadata"]["team"] == "docs"


def test_ingest_url_then_status_and_jobs(api_server: str, workers, page_server: str) -> None:
    run = morag(api_server, "ingest", f"{page_server}/notes.html")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("submitted ")
    task_id = run.stdout.split()[1]

    queued = morag(api_server, "status", task_id)
    assert queued.returncode == 0 and f"task_id: {task_id}" in queued.stdout
    assert "status: pending" in queued.stdout  # no web worker yet

    workers.start(queues="web_processing")
    with MoragClient(api_server) as client:
        final = client.wait(task_id, timeout=60)
    assert final["status"] == "success", final

    listed = morag(api_server, "jobs", "--state", "success", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.strip().splitlines()
    assert header.split()[:3] == ["TASK", "ID", "STATUS"]
    assert [row.split()[:3] for row in rows] == [[task_id, "success", "web"]]
    as_json = json.loads(morag(api_server, "jobs", "--json").stdout)
    assert [item["task_id"] for item in as_json["items"]] == [task_id]
    assert morag(api_server, "jobs", "--state", "failure").stdout.strip() == "no jobs"


def test_failed_job_exits_1_with_its_error(api_server: str, workers, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n" + b"\x00not really a pdf\x00" * 64)
    workers.start(queues="document_processing")
    run = morag(api_server, "ingest", str(broken), "--wait")
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.startswith("failed: ") and "status: failure" in run.stdout
    assert "error: " in run.stdout


def test_cancel_and_clear_errors(api_server: str, workers, notes: Path) -> None:
    run = morag(api_server, "ingest", str(notes), "--json")  # no document worker: stays queued
    assert run.returncode == 0, run.stderr
    task_id = json.loads(run.stdout)["task_id"]

    cancelled = morag(api_server, "cancel", task_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"revoked: {task_id}")
    again = morag(api_server, "cancel", task_id)
    assert again.returncode == 3 and "HTTP 409" in again.stderr, again.stderr
    waited = morag(api_server, "ingest", str(notes), "--wait", "--timeout", "0.5")
    assert waited.returncode == 4 and "did not finish within 0.5 s" in waited.stderr

    unknown = morag(api_server, "status", "00000000-0000-4000-8000-000000000000")
    assert unknown.returncode == 3 and "not_found" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    refused = morag(api_server, "ingest", "http://10.0.0.1/page")  # checked, never fetched
    assert refused.returncode == 3 and "forbidden_target" in refused.stderr, refused.stderr

    missing = morag(api_server, "ingest", "/no/such/file.md")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_meta = morag(api_server, "ingest", str(notes), "--metadata", "[1, 2]")
    assert bad_meta.returncode == 2 and "JSON object" in bad_meta.stderr

    nobody = f"http://127.0.0.1:{free_port()}"
    down = morag(nobody, "jobs")
    assert down.returncode == 3 and "cannot reach the morag API" in down.stderr


def test_api_key_is_sent_as_bearer(api_factory) -> None:
    base = api_factory.start(api_keys="k-one-key,k-two-key").url
    anonymous = morag(base, "jobs")
    assert anonymous.returncode == 3 and "HTTP 401" in anonymous.stderr
    keyed = morag(base, "jobs", MORAG_API_KEY="k-two-key")
    assert keyed.returncode == 0 and keyed.stdout.strip() == "no jobs", keyed.stderr
    flag = morag(base, "jobs", "--api-key", "wrong")
    assert flag.returncode == 3 and "HTTP 401" in flag.stderr
