"""``presented_key`` (the status read's fast path) must read the same key from the headers
as FastAPI's ``bearer_scheme`` and ``api_key_scheme`` hand to ``authenticate``."""

from __future__ import annotations

import asyncio

import pytest
from starlette.datastructures import Headers
from starlette.requests import Request

from morag.api.deps import api_key_scheme, bearer_scheme
from morag.api.edge import presented_key

HEADER_SETS = [
    {},
    {"Authorization": "Bearer key-one"},
    {"authorization": "bearer key-one"},
    {"Authorization": "BEARER   key-one  "},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic a2V5LW9uZQ=="},
    {"Authorization": "key-one"},
    {"X-API-Key": "key-two"},
    {"x-api-key": ""},
    {"Authorization": "Bearer key-one", "X-API-Key": "key-two"},
    {"Authorization": "Basic xyz", "X-API-Key": "key-two"},
    {"Authorization": "Bearer", "X-API-Key": "key-two"},
]


async def _as_authenticate_sees_it(headers: dict[str, str]) -> str | None:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    request = Request(scope)
    bearer = await bearer_scheme(request)
    api_key = await api_key_scheme(request)
    return (bearer.credentials if bearer else None) or api_key


@pytest.mark.parametrize("headers", HEADER_SETS)
def test_presented_key_reads_headers_as_the_security_schemes_do(headers: dict[str, str]) -> None:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    expected = asyncio.run(_as_authenticate_sees_it(headers))
    assert presented_key(Headers(raw=raw)) == (expected or None)
