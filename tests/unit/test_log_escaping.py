"""Every log line is one line of plain text: control characters in any field, in either
format, and in stdlib records, are written as escapes (core/logging.py)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from morag.core.logging import (
    EscapeControlCharacters,
    configure_logging,
    escape_control,
    escape_control_characters,
)

# A character the reader's terminal or log viewer would act on, anywhere in a line.
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

HOSTILE = {
    "crlf": "GET /x\r\nlevel=info event=forged",
    "ansi": "\x1b[2J\x1b[31mred",
    "nul": "a\x00b",
    "mixed": "tab\tdel\x7fcsi\x9bls\u2028rlo\u202eend",
}


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def logged_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert err.endswith("\n")
    return err[:-1].split("\n")


def test_escape_control_writes_escapes() -> None:
    assert escape_control("a\r\nb") == "a\\r\\nb"
    assert escape_control("\x1b[31m") == "\\x1b[31m"
    assert escape_control("\x00\x7f\x9b") == "\\x00\\x7f\\x9b"
    assert escape_control("\u2028\u202e") == "\\u2028\\u202e"
    assert escape_control("line\r\nnext", keep_newlines=True) == "line\\r\nnext"
    assert escape_control("plain text, ümlauts, 日本") == "plain text, ümlauts, 日本"


@pytest.mark.parametrize("as_json", [False, True], ids=["logfmt", "json"])
def test_structlog_fields_are_escaped_in_both_formats(
    capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    configure_logging("INFO", json=as_json)
    structlog.get_logger("t").warning(
        "event\r\nforged",
        **HOSTILE,
        nested={"k\x1b": ["v\r", 1, None]},
        error=ValueError("boom\x1b[0m"),
        **{"key\rwith": "control"},
    )
    (line,) = logged_lines(capsys)
    assert not RAW_CONTROL.search(line), repr(line)
    if as_json:
        event = json.loads(line)
        assert event["event"] == "event\\r\\nforged"
        assert event["crlf"] == "GET /x\\r\\nlevel=info event=forged"
        assert event["ansi"] == "\\x1b[2J\\x1b[31mred"
        assert event["nul"] == "a\\x00b"
        assert event["mixed"] == "tab\\tdel\\x7fcsi\\x9bls\\u2028rlo\\u202eend"
        assert event["nested"] == {"k\\x1b": ["v\\r", 1, None]}
        assert event["error"] == "boom\\x1b[0m"
        assert event["key\\rwith"] == "control"
    else:
        assert "event=" in line and "\\r\\nforged" in line
        assert "\\x1b[2J\\x1b[31mred" in line
        assert "ansi=" in line and "nul=a\\x00b" in line
        assert "key\\rwith=control" in line


@pytest.mark.parametrize("as_json", [False, True], ids=["logfmt", "json"])
def test_a_traceback_keeps_its_lines_but_loses_its_controls(
    capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    configure_logging("INFO", json=as_json)
    try:
        raise RuntimeError("bad\r\x1b[2Jinput")
    except RuntimeError:
        structlog.get_logger("t").exception("failed")
    (line,) = logged_lines(capsys)  # one line: the renderer escapes the newlines
    assert not RAW_CONTROL.search(line), repr(line)
    if as_json:
        traceback = json.loads(line)["exception"]
        assert "\n" in traceback and "RuntimeError: bad\\r\\x1b[2Jinput" in traceback


def test_the_processor_leaves_clean_events_alone() -> None:
    event = {"event": "job finished", "task_id": "3f0c", "status": 200, "ms": 1.5, "ok": True}
    assert escape_control_characters(None, "info", dict(event)) == event


def test_stdlib_records_are_escaped() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    handler.addFilter(EscapeControlCharacters())
    log = logging.getLogger("morag.test.stdlib")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("received %s", "GET /a\r\nWARNING forged \x1b[2J")
        try:
            raise ValueError("in\rside\x00")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING morag.test.stdlib received GET /a\\r\\nWARNING forged \\x1b[2J"
    assert lines[1] == "ERROR morag.test.stdlib failed"
    assert lines[-1] == "ValueError: in\\rside\\x00"  # the traceback keeps its lines
    assert not any(RAW_CONTROL.search(line) for line in lines)
