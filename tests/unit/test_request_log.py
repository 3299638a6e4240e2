"""The API renders its per-request log line with structlog's renderer alone, for speed
(api/main.py): the line must read exactly as structlog, set up by ``configure_logging``,
would have written it, control characters escaped as the processor chain escapes them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import structlog

from morag.api.main import render_request_line
from morag.core.logging import configure_logging, escape_control

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")

REQUESTS = [
    ("GET", "/api/v1/status/3f0c6a1e-0000-4000-8000-000000000001", 200, 1.2, "3f0c6a1e", "ops"),
    ("POST", "/api/v1/ingest/url", 202, 12.0, None, "anonymous"),
    ("GET", "/api/v1/status/a b/ü", 404, 0.3, "a b/ü", None),
    ("DELETE", "/x\nforged=line\t'\"", 422, 1000.5, "x\ry", "key-0123456789ab"),
    ("GET", "/a\\b c", 200, 0.0, "a\\b", None),
    ("GET", "/api/v1/status/x\r\nlevel=info event=forged", 404, 0.4, "x\r\nlevel=info", None),
    ("G\x1bT", "/\x1b[2J\x1b[31m\x00\x7f\u202e", 404, 0.1, None, "o\x1bwner"),
]
# A character a terminal or log viewer would act on.
_RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize("as_json", [False, True], ids=["logfmt", "json"])
@pytest.mark.parametrize("request_fields", REQUESTS)
def test_request_line_reads_as_structlog_writes_it(
    capsys: pytest.CaptureFixture[str], as_json: bool, request_fields: tuple
) -> None:
    configure_logging("INFO", json=as_json)
    method, path, status, duration_ms, task_id, owner = request_fields
    structlog.get_logger("morag.api").info(
        "request",
        method=method,
        path=path,
        status=status,
        duration_ms=duration_ms,
        task_id=task_id,
        owner=owner,
    )
    written = capsys.readouterr().err.rstrip("\n")
    rendered = render_request_line(*request_fields)
    assert _TIMESTAMP.sub("<ts>", rendered) == _TIMESTAMP.sub("<ts>", written)


@pytest.mark.parametrize("as_json", [False, True], ids=["logfmt", "json"])
@pytest.mark.parametrize("request_fields", REQUESTS)
def test_request_line_is_one_line_without_control_characters(
    as_json: bool, request_fields: tuple
) -> None:
    configure_logging("INFO", json=as_json)
    method, path, _, _, task_id, owner = request_fields
    rendered = render_request_line(*request_fields)
    assert not _RAW_CONTROL.search(rendered), repr(rendered)
    if as_json:
        assert json.loads(rendered)["path"] == escape_control(path)
    else:
        for char, escape in (("\r", "\\r"), ("\x1b", "\\x1b"), ("\x00", "\\x00")):
            assert (escape in rendered) == (char in f"{method}{path}{task_id}{owner}")
