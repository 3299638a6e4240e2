"""Dependencies of the API routes, as ``Annotated`` aliases.

``Principal`` is the API-key check: when ``settings.api_keys`` is empty every caller is
``anonymous``; otherwise a key must come as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>`` and is compared with every configured key in constant time. The
principal (a hash of the key, never the key) scopes Idempotency-Keys per client.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import Scope

from morag.core.config import Settings
from morag.core.errors import AuthenticationError
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


def key_matches(presented: str, keys: list[str]) -> bool:
    """Compare with every key (no early exit), each in constant time."""
    given = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched


async def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    api_key: Annotated[str | None, Security(api_key_scheme)],
) -> str:
    """The caller's principal; 401 when keys are configured and none matches."""
    # Settings straight from the app, not through SettingsDep: every request runs this, and
    # FastAPI solves each sub-dependency anew per request.
    settings: Settings = request.app.state.settings
    return principal_for(settings, (bearer.credentials if bearer else None) or api_key)


def principal_for(settings: Settings, presented: str | None) -> str:
    """The principal of the key a caller presented; 401 when keys are configured and it
    matches none of them."""
    if not settings.api_keys:
        return "anonymous"
    if not presented:
        raise AuthenticationError(
            "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
        )
    if not key_matches(presented, settings.api_keys):
        raise AuthenticationError("the API key is not valid")
    return "key-" + hashlib.sha256(presented.encode()).hexdigest()[:16]


def presented_key(headers: Headers) -> str | None:
    """The key as ``authenticate`` receives it from ``bearer_scheme`` and ``api_key_scheme``
    (the same parsing), for code that runs outside FastAPI's dependencies."""
    authorization = headers.get("Authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    bearer = credentials if authorization and credentials and scheme.lower() == "bearer" else None
    return bearer or headers.get("X-API-Key") or None


def scope_principal(scope: Scope) -> str | None:
    """``authenticate`` for code that runs before FastAPI (the fast paths): the principal,
    or None when the key check fails (the route then answers with its documented 401)."""
    settings: Settings = scope["app"].state.settings
    if not settings.api_keys:
        return "anonymous"
    try:
        return principal_for(settings, presented_key(Headers(scope=scope)))
    except AuthenticationError:
        return None


Principal = Annotated[str, Depends(authenticate)]

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
