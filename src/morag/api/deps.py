"""Dependencies of the API routes, as ``Annotated`` aliases.

``Caller`` is the ``Principal`` the ``Authentication`` middleware resolved from the API key
(api/edge.py): its name owns the jobs it submits, and scopes every read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from morag.core.config import Settings
from morag.core.errors import AuthenticationError
from morag.core.principals import Principal
from morag.services.ingestion import IngestionService

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="An API key as a bearer token (required when the server has API keys).",
)
api_key_scheme = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="apiKey",
    description="An API key (required when the server has API keys).",
)


# Dependencies that do no I/O are ``async``: FastAPI runs sync ones in its thread pool,
# one hop per dependency per request.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_service(request: Request) -> IngestionService:
    return request.app.state.ingestion  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[IngestionService, Depends(get_service)]


async def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> Principal:
    """The caller, as the ``Authentication`` middleware (api/edge.py) resolved it before the
    body was read; the parameters document the two ways of sending a key in OpenAPI."""
    principal: Principal | None = request.scope.get("state", {}).get("principal")
    if principal is None:  # the middleware refuses these first; never trust a gap
        raise AuthenticationError("an API key is required")
    return principal


Caller = Annotated[Principal, Depends(authenticate)]

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Repeat a request with the same key to get the original answer (the "
        "same job or batch) instead of a new job. Keys are kept as long as results.",
    ),
]
