"""The API's edge: which hosts it answers for, which browser pages may change state, and
who the caller is. Three small ASGI middlewares, run before anything reads the body.

- ``HostAllowList``: a request naming another ``Host`` answers 400 (a DNS-rebinding page
  reaches the server under the attacker's name, and this is where it stops).
- ``OriginCheck``: a state-changing request sent by a browser page from an origin that is
  neither the server's own nor a configured CORS origin answers 403 (browsers send form
  posts and multipart uploads cross-origin without asking first).
- ``Authentication``: resolves the caller's key to a ``Principal`` and puts it in the
  request's state; under the protected prefixes, a missing or unknown key answers 401
  before the body is read or parsed.

The decisions and what they cover are in docs/security.md.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from morag.api.errors import error_response
from morag.core.config import Settings
from morag.core.errors import ConfigurationError
from morag.core.principals import ANONYMOUS, KeyTable, Principal

_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(bind_host: str) -> bool:
    """Whether binding ``bind_host`` keeps the API reachable from this machine only."""
    if bind_host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_bind(cfg: Settings, bind_host: str) -> None:
    """Refuse to serve a non-loopback address without keys, unless the settings say an
    authenticating proxy (or a trusted network) stands in front."""
    if is_loopback(bind_host) or cfg.key_table().keyed or cfg.allow_public_without_keys:
        return
    raise ConfigurationError(
        f"refusing to serve {bind_host} without API keys: anyone who can reach it could "
        "submit, read and cancel jobs. Set MORAG_API_KEYS (name:key,...), or set "
        "MORAG_ALLOW_PUBLIC_WITHOUT_KEYS=true if an authenticating proxy stands in front"
    )


def host_name(value: str) -> str:
    """The host of a ``Host`` header or an authority, lower-cased, without port or
    brackets; '' when it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else ""
    if value.count(":") > 1:
        return ""  # a bare IPv6 address must be bracketed in a Host header
    return value.partition(":")[0].rstrip(".")


def _allowed_name(entry: str) -> str:
    """A configured host as ``host_name`` reads it from a request (IPv6 with or without
    brackets, a port ignored)."""
    try:
        return str(ipaddress.ip_address(entry.strip("[]")))
    except ValueError:
        return host_name(entry)


class HostAllowList:
    """400 for a ``Host`` not in the allow-list (``*`` allows every host)."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        names = [h.strip().lower() for h in hosts if h.strip()]
        self.any_host = "*" in names
        self.hosts = frozenset(_allowed_name(h) for h in names if h != "*")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.any_host:
            host = _header(scope, b"host")
            if host is not None and host_name(host) not in self.hosts:
                response = error_response(
                    400,
                    "host_not_allowed",
                    "this server does not answer for that Host; set MORAG_ALLOWED_HOSTS to "
                    "the names clients use to reach it",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OriginCheck:
    """403 for a state-changing request whose ``Origin`` is foreign: neither the server's
    own origin (same host and port as the ``Host`` it was sent to) nor a CORS origin."""

    def __init__(self, app: ASGIApp, cors_origins: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(o.rstrip("/").lower() for o in cors_origins)
        self.any_origin = "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _STATE_CHANGING:
            origin = _header(scope, b"origin")
            if origin is not None and not self._allowed(origin, _header(scope, b"host") or ""):
                response = error_response(
                    403,
                    "origin_not_allowed",
                    "requests that change state are refused from another site's pages; add "
                    "the page's origin to MORAG_CORS_ORIGINS to allow it",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if self.any_origin or origin in self.allowed:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.lower()


class Authentication:
    """Puts the caller's ``Principal`` in ``scope["state"]["principal"]``; under the
    protected path prefixes, answers 401 when keys are configured and none matches."""

    def __init__(self, app: ASGIApp, keys: KeyTable, protected: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        principal, problem = self.principal(Headers(scope=scope))
        if principal is None and self._is_protected(scope):
            response = error_response(
                401, "unauthorized", problem, headers={"WWW-Authenticate": 'Bearer realm="morag"'}
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def principal(self, headers: Headers) -> tuple[Principal | None, str]:
        """The caller, or None and why not."""
        if not self.keys.keyed:
            return ANONYMOUS, ""
        presented = presented_key(headers)
        if not presented:
            return None, (
                "an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        principal = self.keys.lookup(presented)
        if principal is None:
            return None, "the API key is not valid"
        return principal, ""

    def _is_protected(self, scope: Scope) -> bool:
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return path.startswith(self.protected)


def presented_key(headers: Headers) -> str | None:
    """The key as FastAPI's ``bearer_scheme`` and ``api_key_scheme`` (api/deps.py) read it,
    for the OpenAPI document: ``Authorization: Bearer <key>``, else ``X-API-Key``."""
    authorization = headers.get("Authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    bearer = credentials if authorization and credentials and scheme.lower() == "bearer" else None
    return bearer or headers.get("X-API-Key") or None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None
