"""Lua scripts run on every job, with their key names written into their text.

The job record's per-job scripts (services/jobs.py) and the broker's delivery bookkeeping
(core/broker.py) run several times per job. Written with their keys in their text, a call
sends what changes per call and nothing else: the client packs each argument, and Redis
turns each into a Lua string on every call.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any

import hiredis
import redis


def lua_string(value: str) -> str:
    """``value`` as a Lua string literal: letters and digits as they are, every other byte
    escaped (``\\ddd``), so no key prefix can break out of it."""
    return (
        '"'
        + "".join(
            chr(b) if chr(b).isascii() and chr(b).isalnum() else f"\\{b:03d}"
            for b in value.encode()
        )
        + '"'
    )


class _KeptConnection:
    """The one connection a client's pool lends, for good, to this process's script calls
    (kept on the pool: as many as there are pools, however many scripts come and go)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held by the call using it
        self.pid = os.getpid()
        self.connection: Any = None

    @staticmethod
    def of(pool: Any) -> _KeptConnection:
        kept = getattr(pool, "_morag_kept_connection", None)
        if kept is None or kept.pid != os.getpid():  # a forked child takes its own
            with _kept_lock:
                kept = getattr(pool, "_morag_kept_connection", None)
                if kept is None or kept.pid != os.getpid():
                    kept = pool._morag_kept_connection = _KeptConnection()
        return kept  # type: ignore[no-any-return]


_kept_lock = threading.Lock()


class DirectScript:
    """A script whose keys are in its text, called as ``script(client, *args)``.

    EVALSHA goes over a connection the client's pool lends for good to the script calls
    of this process: redis-py 8's ``execute_command`` takes a pooled connection for each
    command and checks it with a non-blocking read, records observability figures and
    wraps the call in its retry closures, which cost a short script call more than its
    round trip. A call made while another thread is on that connection (the API's
    threads) takes a pooled one instead of waiting. kombu's clients (which prefix keys
    themselves) would also take the first argument for a key and prefix it. Arguments
    are packed by hiredis in one C call (redis-py checks and encodes each in Python: 14
    µs against 2 for fifteen). A broken connection (a Redis restart) is replaced and the
    call sent once more, as redis-py's default retry does; a Redis that lost its
    scripts is sent the script again.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: redis.Redis, *args: Any) -> Any:
        kept = _KeptConnection.of(client.connection_pool)
        if not kept.lock.acquire(blocking=False):
            return self._loaded(
                client, lambda: redis.Redis.execute_command(client, "EVALSHA", self.sha, 0, *args)
            )
        try:
            return self._loaded(client, lambda: self._evalsha(kept, client, args))
        finally:
            kept.lock.release()

    def _loaded(self, client: redis.Redis, call: Callable[[], Any]) -> Any:
        """``call()``, once more after loading the script into a Redis that lost it."""
        try:
            return call()
        except redis.exceptions.NoScriptError:
            self.sha = client.script_load(self.source)
            return call()

    def _evalsha(self, kept: _KeptConnection, client: redis.Redis, args: tuple[Any, ...]) -> Any:
        packed = hiredis.pack_command(("EVALSHA", self.sha, 0, *args))
        for attempt in (1, 2):
            if kept.connection is None:
                # lent for good: the pool closes it with its other connections
                kept.connection = client.connection_pool.get_connection()
            try:
                kept.connection.send_packed_command([packed])
                return kept.connection.read_response()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                kept.connection.disconnect()  # its state is unknown: reconnected next time
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
