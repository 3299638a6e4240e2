"""structlog set-up shared by the API, workers and the CLI.

Every log line is one line of plain text: control characters in any field (a request
path with ``%0d``, a file name with an ANSI escape) are written as escapes (``\\r``,
``\\x1b``), so nobody can forge a line or drive the reader's terminal. structlog events
get this from ``escape_control_characters`` in the processor chain; stdlib records (Celery,
uvicorn) from the ``EscapeControlCharacters`` filter on their handlers. httpx's request
lines show URLs as ``redact_url`` does (a webhook's token stays out of the log).
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

import httpx
import structlog

from morag.core.redaction import redact_url

# C0 controls, DEL, C1 controls (0x9b is CSI on some terminals), the Unicode line and
# paragraph separators and the bidi embeddings/overrides/isolates (they reorder a line).
_OTHER_CONTROLS = r"\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(rf"[\x00-\x1f{_OTHER_CONTROLS}]")
_CONTROL_BUT_NEWLINE = re.compile(rf"[\x00-\x09\x0b-\x1f{_OTHER_CONTROLS}]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Fields that keep their newlines: tracebacks are many lines by nature, and both renderers
#: escape a newline themselves (logfmt writes ``\n``, JSON encodes it).
_MULTILINE_FIELDS = frozenset({"exception", "stack"})
_PLAIN_TYPES = frozenset({int, float, bool, type(None)})


def _escape_match(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\r``, ``\\x1b``)."""
    if text.isprintable():  # the common case, checked in C: nothing to do
        return text
    pattern = _CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL
    return pattern.sub(_escape_match, text)


def _escaped(value: Any, keep_newlines: bool = False) -> Any:
    if isinstance(value, str):
        return escape_control(value, keep_newlines)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_escaped(v) for v in value]
    return escape_control(str(value))  # an exception, a path: the text the renderer writes


def escape_control_characters(
    _: Any, __: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """structlog processor: escape control characters in every key and value."""
    for key, value in event_dict.items():
        kind = type(value)
        if kind is str:
            if not value.isprintable():
                event_dict[key] = escape_control(value, key in _MULTILINE_FIELDS)
        elif kind not in _PLAIN_TYPES:
            event_dict[key] = _escaped(value, key in _MULTILINE_FIELDS)
    if not "".join(event_dict).isprintable():  # keys are code's, but may come from input
        for key in [k for k in event_dict if not k.isprintable()]:
            event_dict[escape_control(key)] = event_dict.pop(key)
    return event_dict


class EscapeControlCharacters(logging.Filter):
    """A handler filter: the record's message (and traceback) with control characters
    escaped, as ``escape_control_characters`` does for structlog events."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad arguments: the formatter reports them, as without a filter
            return True
        if not message.isprintable():
            record.msg, record.args = escape_control(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = escape_control(record.exc_text, keep_newlines=True)
        if record.stack_info:
            record.stack_info = escape_control(record.stack_info, keep_newlines=True)
        return True


class RedactUrls(logging.Filter):
    """A logger filter for httpx, which logs every request's full URL at INFO: the URLs
    in its records shown without user info, query and fragment (``redact_url``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(
                redact_url(str(a)) if isinstance(a, httpx.URL) else a for a in record.args
            )
        return True


def redact_http_client_logs() -> None:
    """Webhook and fetched URLs in httpx's request lines lose their secrets (once)."""
    client_logger = logging.getLogger("httpx")
    if not any(isinstance(f, RedactUrls) for f in client_logger.filters):
        client_logger.addFilter(RedactUrls())


def escape_stdlib_logs(logger: logging.Logger) -> None:
    """Add the escaping filter to ``logger``'s handlers (once each)."""
    for handler in logger.handlers:
        if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
            handler.addFilter(EscapeControlCharacters())


def configure_structlog(
    level: str = "INFO", json: bool = False, stream: TextIO | None = None
) -> None:
    """structlog lines (logfmt, or JSON) written straight to ``stream`` (stderr)."""
    # logfmt rather than structlog's padded console columns: log shippers parse it, and it
    # costs a third less per line (every job writes two).
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.processors.LogfmtRenderer(
            key_order=["timestamp", "level", "event"], drop_missing=True
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            escape_control_characters,  # last before the renderer: every field, all added
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
    redact_http_client_logs()


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    """Route structlog and stdlib logging to stderr as logfmt lines (or JSON)."""
    configure_structlog(level, json)
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s"
    )
    escape_stdlib_logs(logging.getLogger())
