"""``morag worker`` whose process can reach only loopback, recording every other attempt.

Installed before the worker starts (pool children inherit it by fork):

* ``socket.socket.connect``/``connect_ex`` to any address that is not loopback (or a unix
  socket) is blocked with ``ConnectionRefusedError`` and recorded;
* ``socket.getaddrinfo`` of a name (not a literal address) never reaches DNS: names in
  ``MORAG_TEST_FAKE_HOSTS`` (JSON ``{"name": ["ip", ...]}``) get those answers, any other
  name is recorded and fails as unknown.

Records go, one JSON object a line, to ``MORAG_TEST_TRIPWIRE_LOG``. A scenario asserts that
file holds no ``connect`` record: had the SSRF guard let a forbidden address through, the
attempt would be stopped here and show up there, never leave the machine.

Run as ``python -m tests.reliability.tripwire_worker worker --queues=web_processing``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from typing import Any

_LOG = os.environ["MORAG_TEST_TRIPWIRE_LOG"]
_FAKE_HOSTS: dict[str, list[str]] = json.loads(os.environ.get("MORAG_TEST_FAKE_HOSTS", "{}"))
_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _record(kind: str, target: Any) -> None:
    with open(_LOG, "a") as log:
        log.write(json.dumps({"pid": os.getpid(), "kind": kind, "target": repr(target)}) + "\n")


def _is_loopback(address: Any) -> bool:
    if isinstance(address, str | bytes):
        return True  # a unix socket path
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _connect(self: socket.socket, address: Any) -> None:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        _record("connect", address)
        raise ConnectionRefusedError(f"tripwire: blocked a connection to {address!r}")
    return _real_connect(self, address)


def _connect_ex(self: socket.socket, address: Any) -> int:
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        _record("connect", address)
        return 111  # ECONNREFUSED
    return _real_connect_ex(self, address)


def _getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, *args: Any, **kw: Any):
    name = host.decode() if isinstance(host, bytes) else host
    if name is None:
        return _real_getaddrinfo(host, port, family, type, *args, **kw)
    try:
        ipaddress.ip_address(str(name).split("%")[0])
        return _real_getaddrinfo(host, port, family, type, *args, **kw)  # a literal address
    except ValueError:
        pass
    answers = _FAKE_HOSTS.get(str(name).lower().rstrip("."))
    if answers is None:
        _record("resolve", name)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (tripwire)")
    _record("fake-resolve", name)
    return [
        (
            socket.AF_INET6 if ":" in ip else socket.AF_INET,
            socket.SOCK_STREAM,
            6,
            "",
            (ip, int(port or 0), 0, 0) if ":" in ip else (ip, int(port or 0)),
        )
        for ip in answers
    ]


socket.socket.connect = _connect  # type: ignore[method-assign]
socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign]
socket.getaddrinfo = _getaddrinfo

if __name__ == "__main__":
    from morag.cli import app

    app()
