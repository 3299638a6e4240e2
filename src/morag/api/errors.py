"""One error shape for every 4xx/5xx: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import re
from typing import Any

import redis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from morag.core.errors import MoragError

logger = structlog.get_logger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "input_gone",
    413: "limit_exceeded",
    415: "unsupported_format",
    422: "invalid_input",
    429: "too_many_requests",
    431: "headers_too_large",
    503: "unavailable",
}

_DESCRIPTIONS = {
    401: "missing or invalid API key",
    404: "no such job (or batch)",
    409: "the job is not in a state that allows this",
    410: "the job's uploaded input was deleted when the job finished; upload it again",
    413: "a size or count limit was exceeded",
    415: "unsupported file type or request content type",
    422: "invalid request: details name the field",
    429: "too many at once for this client (Retry-After says when to try again)",
    500: "internal error (no traceback is sent)",
    503: "unavailable for now (Retry-After says when to try again)",
}


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = {}


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for these error codes, all with the one error shape."""
    return {
        code: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(code, "error")}
        for code in codes
    }


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return JSONResponse(body, status_code=status, headers=headers)


_AT_LINE_COLUMN = re.compile(r" at line (\d+) column (\d+)$")


def json_error(exc: RequestValidationError) -> str | None:
    """Why and where the request body is not JSON (``Expecting ',' delimiter at line 1,
    column 17``), or None when it is.

    FastAPI's own parse error gives the reason and an offset into the body; pydantic's (a
    route that validates raw JSON) gives the reason with the place already in it.
    """
    for err in exc.errors():
        if err.get("type") != "json_invalid":
            continue
        reason = str((err.get("ctx") or {}).get("error") or err.get("msg") or "")
        loc = tuple(err.get("loc") or ())
        doc = exc.body
        if len(loc) == 2 and isinstance(loc[1], int) and isinstance(doc, str):
            pos = loc[1]
            line = doc.count("\n", 0, pos) + 1
            column = pos - doc.rfind("\n", 0, pos)
            return f"{reason} at line {line}, column {column}"
        return _AT_LINE_COLUMN.sub(r" at line \1, column \2", reason)
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MoragError)
    async def _morag_error(request: Request, exc: MoragError) -> JSONResponse:
        if exc.http_status >= 500:
            logger.error("request failed", path=request.url.path, error=exc.message)
        headers = {"WWW-Authenticate": 'Bearer realm="morag"'} if exc.http_status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return error_response(exc.http_status, exc.code, exc.message, exc.details, headers or None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        broken = json_error(exc)
        if broken is not None:
            return error_response(
                422,
                "invalid_input",
                f"the request body is not valid JSON: {broken}",
                {"errors": [{"field": "body", "message": broken}]},
            )
        errors = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                "message": err.get("msg", "invalid value"),
            }
            for err in exc.errors()
        ]
        fields = ", ".join(e["field"] or "body" for e in errors)
        return error_response(
            422, "invalid_input", f"invalid request: check {fields}", {"errors": errors}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's answer to a body it could not parse (not UTF-8, nested deeper than
            # Python parses): an invalid request like any other, so 422, saying why.
            cause = exc.__cause__
            reason = (
                "nested too deeply"
                if isinstance(cause, RecursionError)
                else f"not UTF-8 text ({cause.reason})"
                if isinstance(cause, UnicodeDecodeError)
                else "not parseable"
            )
            return error_response(
                422,
                "invalid_input",
                f"the request body is {reason}",
                {"errors": [{"field": "body", "message": f"the body is {reason}"}]},
            )
        code = _HTTP_CODES.get(exc.status_code, "error")
        return error_response(
            exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    @app.exception_handler(OperationalError)  # kombu's, when a publish found Redis away
    async def _redis_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # Redis restarting is an outage the client can wait out, not a server bug.
        logger.warning("job store unreachable", path=request.url.path, error=str(exc))
        return error_response(
            503,
            "unavailable",
            "the job store (Redis) is unreachable; retry shortly",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", path=request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")
