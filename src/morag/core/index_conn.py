"""Connections to the index's PostgreSQL, from one URL setting (``MORAG_INDEX_URL``).

``postgresql://user:password@host:port/database`` for a server on the network, or
``postgresql://user@/database?host=/a/socket/dir`` (libpq's form) for a unix socket, which
is how the embedded server is reached. The client is pg8000 (pure Python, BSD): nothing to
compile, and no LGPL driver in the install.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pg8000.exceptions
import pg8000.native

from morag.core.errors import ConfigurationError

#: What a connection that cannot reach the server raises (a restart, a network cut).
UNREACHABLE: tuple[type[BaseException], ...] = (
    pg8000.exceptions.InterfaceError,
    ConnectionError,
    OSError,
)
#: SQLSTATEs that mean the server is going away or not yet there: retry later.
UNAVAILABLE_STATES = frozenset(
    {"57P01", "57P02", "57P03", "08000", "08003", "08006", "08001", "08004", "53300"}
)


@dataclass(frozen=True)
class IndexAddress:
    user: str
    password: str | None
    database: str
    host: str | None = None
    port: int = 5432
    unix_sock: str | None = None
    ssl: bool = False

    def describe(self) -> str:
        """Where it is, without the password (for logs and messages)."""
        where = self.unix_sock or f"{self.host}:{self.port}"
        return f"postgresql {self.user}@{where}/{self.database}"


def parse_index_url(url: str) -> IndexAddress:
    """An ``IndexAddress`` from a ``postgresql://`` URL; ConfigurationError when malformed."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(
            "MORAG_INDEX_URL must be a postgresql:// URL", details={"scheme": parts.scheme}
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    database = unquote(parts.path.lstrip("/")) or "morag"
    user = unquote(parts.username or "") or query.get("user") or "morag"
    password = unquote(parts.password) if parts.password else query.get("password")
    port = parts.port or int(query.get("port", 5432))
    host = parts.hostname or query.get("host")
    if host and host.startswith("/"):
        return IndexAddress(
            user, password, database, port=port, unix_sock=f"{host}/.s.PGSQL.{port}"
        )
    return IndexAddress(
        user,
        password,
        database,
        host=host or "127.0.0.1",
        port=port,
        ssl=query.get("sslmode", "disable") not in ("disable", "allow", "prefer"),
    )


def connect(url: str | IndexAddress, timeout: float = 10.0, database: str | None = None) -> Any:
    """A new ``pg8000.native.Connection`` (one per thread: connections are not shared)."""
    address = parse_index_url(url) if isinstance(url, str) else url
    kwargs: dict[str, Any] = {
        "user": address.user,
        "password": address.password,
        "database": database or address.database,
        "timeout": timeout,
        "application_name": "morag",
    }
    if address.unix_sock:
        kwargs["unix_sock"] = address.unix_sock
    else:
        kwargs.update(host=address.host, port=address.port)
        if address.ssl:
            kwargs["ssl_context"] = ssl.create_default_context()
    return pg8000.native.Connection(**kwargs)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the server is unreachable or going away (worth waiting for)."""
    if isinstance(exc, pg8000.exceptions.DatabaseError) and exc.args:
        info = exc.args[0]
        if isinstance(info, dict):
            return info.get("C") in UNAVAILABLE_STATES
    return isinstance(exc, UNREACHABLE)
