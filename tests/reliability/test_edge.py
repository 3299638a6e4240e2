"""The API's edge against a browser and a hostile client, on a real API process:

* a DNS-rebinding page (any ``Host`` but the server's names) is refused, 400;
* a page of another site cannot change state (foreign ``Origin``: 403), even without keys;
* serving a non-loopback address without keys refuses to start;
* ids are checked before they name a Redis key: any string on any id route answers 4xx,
  never 5xx (ids with ``:`` used to reach the job's history and result keys).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from urllib.parse import quote

import httpx
import pytest

from tests.harness import ROOT

INGEST = "/api/v1/ingest"
STATUS = "/api/v1/status"


def test_a_forged_host_is_refused(api_process) -> None:
    base, _ = api_process()
    with httpx.Client(base_url=base, timeout=10) as http:
        for host in ("rebind.evil.example:8000", "evil.example", "127.0.0.1.evil.example", "[::2]"):
            for path in (f"{STATUS}/?limit=1", "/health", f"{INGEST}/url"):
                reply = http.get(path, headers={"Host": host})
                assert reply.status_code == 400, (host, path, reply.text)
                assert reply.json()["error"]["code"] == "host_not_allowed"
        for host in ("localhost:8000", "127.0.0.1", "LOCALHOST", "[::1]:1234", "localhost."):
            assert http.get(f"{STATUS}/?limit=1", headers={"Host": host}).status_code == 200, host
    named, _ = api_process(allowed_hosts="ingest.internal,10.1.2.3,127.0.0.1")
    with httpx.Client(base_url=named, timeout=10) as http:
        assert http.get("/health", headers={"Host": "ingest.internal:8000"}).status_code == 200
        assert http.get("/health", headers={"Host": "10.1.2.3"}).status_code == 200
        assert http.get("/health", headers={"Host": "localhost"}).status_code == 400


def test_a_foreign_page_cannot_change_state(api_process) -> None:
    base, _ = api_process(cors_origins="https://app.example")
    port = base.rsplit(":", 1)[1]
    with httpx.Client(base_url=base, timeout=10) as http:
        # What a browser sends cross-site without a preflight: a form post, an upload.
        evil = {"Origin": "http://evil.example"}
        for origin in ("http://evil.example", "null", f"http://localhost:{int(port) + 1}"):
            upload = http.post(
                f"{INGEST}/file",
                files={"file": ("x.md", b"# x\n")},
                headers={"Origin": origin},
            )
            assert upload.status_code == 403, (origin, upload.text)
            assert upload.json()["error"]["code"] == "origin_not_allowed"
        form = http.post(
            f"{INGEST}/batch",
            data={"items": '[{"url": "https://example.com/a"}]'},
            headers=evil,
        )
        assert form.status_code == 403, form.text
        never = str(uuid.uuid4())
        assert http.delete(f"{INGEST}/{never}", headers=evil).status_code == 403
        assert http.get(f"{STATUS}/?limit=1", headers=evil).status_code == 200  # no CORS: unread
        assert http.get(f"{STATUS}/", params={"limit": 1}).json()["items"] == []  # nothing queued
        # The server's own pages, a configured CORS origin, and non-browser clients pass.
        for headers in (
            {"Origin": f"http://127.0.0.1:{port}"},
            {"Origin": "https://app.example"},
            {},
        ):
            reply = http.post(f"{INGEST}/file", files={"file": ("x.md", b"# x\n")}, headers=headers)
            assert reply.status_code == 202, (headers, reply.text)


def _morag(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **{f"MORAG_{k.upper()}": v for k, v in env.items()}}
    environment.pop("MORAG_API_KEYS", None)
    return subprocess.run(
        [sys.executable, "-m", "morag.cli", *args],
        env=environment,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("command", ["api", "up"])
def test_a_public_address_without_keys_refuses_to_start(command: str, tmp_path) -> None:
    # Refused before anything binds: no packet leaves this machine.
    run = _morag(command, "--host", "0.0.0.0", "--port", "1", data_dir=str(tmp_path))
    assert run.returncode != 0
    assert "refusing to serve 0.0.0.0 without API keys" in run.stderr, run.stderr
    assert "MORAG_ALLOW_PUBLIC_WITHOUT_KEYS" in run.stderr


ID_ROUTES = [
    ("GET", STATUS + "/{id}"),
    ("GET", STATUS + "/{id}/result"),
    ("GET", STATUS + "/{id}/history"),
    ("GET", STATUS + "/{id}/events"),
    ("GET", STATUS + "/{id}/artifacts/a.jpg"),
    ("DELETE", INGEST + "/{id}"),
    ("POST", INGEST + "/{id}/retry"),
    ("GET", "/api/v1/batches/{id}"),
]


def _any_strings(job: str, count: int, seed: int) -> list[str]:
    """Ids a client could send: the findings' forms on a real job's id, then random strings
    of any characters (control, separators, Unicode, percent-encodings)."""
    fixed = [
        f"{job}:history",
        f"{job}:result",
        f"{job}:lease",
        f"{job}:history/history",
        job.upper(),
        "x" * 5000,
        "%00",
        "..",
        "*",
        "\x00",
        "\r\n",
        "é",
    ]
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0x20)] + list(":/%?#*[]{}.\\'\"` ") + ["é", "𝄞", "\u202e"]
    alphabet += [chr(c) for c in range(0x61, 0x67)] + list("-0123456789")
    randoms = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(count)
    ]
    return fixed + randoms


def test_ids_from_any_string_never_answer_5xx(api_process) -> None:
    base, api = api_process()
    seen: dict[int, int] = {}
    with httpx.Client(base_url=base, timeout=10) as http:
        queued = http.post(f"{INGEST}/file", files={"file": ("x.md", b"# x\n")})
        job = queued.json()["task_id"]  # no worker: its record and history stay
        for text in _any_strings(job, 150, seed=13):
            segment = quote(text, safe="")
            if not segment or segment in (".", ".."):
                continue
            for method, template in ID_ROUTES:
                reply = http.request(method, template.replace("{id}", segment))
                seen[reply.status_code] = seen.get(reply.status_code, 0) + 1
                # A decoded '/' may make another route's path (a redirect, stats): never 5xx.
                assert reply.status_code < 500, (method, template, text, reply.text)
    assert seen.get(422, 0) > 0 and "unhandled error" not in api.log()
