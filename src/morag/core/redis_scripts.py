"""Lua scripts run on every job, with their key names written into their text.

The job record's per-job scripts (services/jobs.py) and the broker's delivery bookkeeping
(core/broker.py) run several times per job. Written with their keys in their text, a call
sends what changes per call and nothing else: redis-py packs each argument in Python, and
Redis turns each into a Lua string on every call.
"""

from __future__ import annotations

import hashlib
import os
import threading
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


class DirectScript:
    """A script whose keys are in its text, called as ``script(client, *args)``.

    EVALSHA goes over a connection this script keeps (one per process), taken once from
    the client's pool: redis-py 8's ``execute_command`` takes a pooled connection for
    each command and checks it with a non-blocking read, records observability figures
    and wraps the call in its retry closures, which cost a short script call more than
    its round trip. A call made while another thread is on the kept connection (the
    API's threads) takes a pooled one instead of waiting. kombu's clients (which prefix
    keys themselves) would also take the first argument for a key and prefix it.
    Arguments are packed by hiredis in one C call (redis-py checks and encodes each in
    Python: 14 µs against 2 for fifteen). A broken connection (a Redis restart) is
    replaced and the call sent once more, as redis-py's default retry does; a Redis
    that lost its scripts is sent the script again.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._lock = threading.Lock()  # held by the call on the kept connection
        self._pid = 0
        self._pool: Any = None
        self._connection: Any = None

    def __call__(self, client: redis.Redis, *args: Any) -> Any:
        if not self._lock.acquire(blocking=False):
            # another thread is on the kept connection (the API's threads): a pooled one
            return self._evalsha_pooled(client, args)
        try:
            try:
                return self._evalsha(client, args)
            except redis.exceptions.NoScriptError:
                self.sha = client.script_load(self.source)
                return self._evalsha(client, args)
        finally:
            self._lock.release()

    def _evalsha_pooled(self, client: redis.Redis, args: tuple[Any, ...]) -> Any:
        try:
            return redis.Redis.execute_command(client, "EVALSHA", self.sha, 0, *args)
        except redis.exceptions.NoScriptError:
            self.sha = client.script_load(self.source)
            return redis.Redis.execute_command(client, "EVALSHA", self.sha, 0, *args)

    def _evalsha(self, client: redis.Redis, args: tuple[Any, ...]) -> Any:
        for attempt in (1, 2):
            connection = self._kept_connection(client)
            try:
                packed = hiredis.pack_command(("EVALSHA", self.sha, 0, *args))
                connection.send_packed_command([packed])
                return connection.read_response()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                connection.disconnect()  # its state is unknown: a new one next time
                self._connection = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _kept_connection(self, client: redis.Redis) -> Any:
        pool = client.connection_pool
        if self._connection is None or self._pool is not pool or self._pid != os.getpid():
            # taken for good: the pool closes it with its other connections
            self._connection, self._pool, self._pid = pool.get_connection(), pool, os.getpid()
        return self._connection
