"""Who is asking: API keys, their names, and the owner every job belongs to.

Keys are configured as ``name:key`` (``MORAG_API_KEYS``, ``MORAG_API_KEYS_FILE``, and
``MORAG_ADMIN_KEYS`` for keys that see every owner's jobs). The name is the owner: it is
what job records, logs and metrics carry, never the key. A bare ``key`` (no name) still
works and is named ``key-`` + the first 12 hex digits of its SHA-256.

Without any key the service is in local single-user mode: every caller is ``anonymous``,
the one owner, who may see every job (there is nobody else to hide them from).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ANONYMOUS_NAME = "anonymous"
#: A key's name: safe in Redis key names, log lines and metric labels.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Keys shorter than this are refused at start-up: a guessable key protects nothing.
MIN_KEY_CHARS = 8


@dataclass(frozen=True)
class Principal:
    """The caller: the owner name its jobs get, and whether it may see every owner's."""

    name: str
    admin: bool = False

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.name


ANONYMOUS = Principal(ANONYMOUS_NAME, admin=True)


class KeyTable:
    """The configured keys, looked up by their SHA-256 (no key is kept in memory as text,
    and a lookup takes the same time whatever the key is)."""

    def __init__(self, entries: dict[bytes, Principal]) -> None:
        self._by_digest = entries

    @property
    def keyed(self) -> bool:
        """False in local single-user mode (no keys configured)."""
        return bool(self._by_digest)

    @property
    def names(self) -> list[str]:
        return sorted({p.name for p in self._by_digest.values()})

    def lookup(self, presented: str) -> Principal | None:
        return self._by_digest.get(_digest(presented))

    @classmethod
    def build(
        cls, api_keys: Sequence[str], admin_keys: Sequence[str] = (), keys_file: Path | None = None
    ) -> KeyTable:
        """Parse ``name:key`` entries; ``ValueError`` naming the entry (by position, never
        by its key) when one is malformed or two share a name or a key."""
        entries: dict[bytes, Principal] = {}
        sources: list[tuple[str, str, bool]] = [
            (f"MORAG_API_KEYS entry {i + 1}", text, False) for i, text in enumerate(api_keys)
        ]
        if keys_file is not None:
            lines = Path(keys_file).read_text().splitlines()
            sources += [
                (f"{keys_file} line {n}", line.strip(), False)
                for n, line in enumerate(lines, 1)
                if line.strip() and not line.strip().startswith("#")
            ]
        sources += [
            (f"MORAG_ADMIN_KEYS entry {i + 1}", text, True) for i, text in enumerate(admin_keys)
        ]
        names: set[str] = set()
        for where, text, admin in sources:
            name, key = parse_entry(text, where)
            if name == ANONYMOUS_NAME:
                raise ValueError(f"{where}: the name {ANONYMOUS_NAME!r} is reserved")
            if name in names:
                raise ValueError(f"{where}: the name {name!r} is used by another key")
            digest = _digest(key)
            if digest in entries:
                raise ValueError(f"{where}: the same key is configured twice")
            names.add(name)
            entries[digest] = Principal(name, admin)
        return cls(entries)


def parse_entry(text: str, where: str) -> tuple[str, str]:
    """``name:key`` → (name, key); a bare key gets a name derived from its hash."""
    name, sep, key = text.partition(":")
    if not sep:
        name, key = "key-" + hashlib.sha256(text.encode()).hexdigest()[:12], text
    elif not NAME_PATTERN.match(name):
        raise ValueError(
            f"{where}: a key's name is 1-64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit (format name:key)"
        )
    if len(key) < MIN_KEY_CHARS or any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError(
            f"{where}: a key must be at least {MIN_KEY_CHARS} printable characters without "
            "spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe())')"
        )
    return name, key


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
