"""Lua scripts run on every job, with their key names written into their text.

The job record's per-job scripts (services/jobs.py) and the broker's delivery bookkeeping
(core/broker.py) run several times per job. Written with their keys in their text, a call
sends what changes per call and nothing else: redis-py packs each argument in Python, and
Redis turns each into a Lua string on every call.
"""

from __future__ import annotations

import hashlib
from typing import Any

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

    EVALSHA goes straight through the client: redis-py's ``Script`` adds a tuple copy, an
    import and two pipeline type checks to each call, and kombu's clients (which prefix
    keys themselves) would take the first argument for a key and prefix it. A Redis that
    lost its scripts (a restart) is sent the script again.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: redis.Redis, *args: Any) -> Any:
        try:
            return redis.Redis.execute_command(client, "EVALSHA", self.sha, 0, *args)
        except redis.exceptions.NoScriptError:
            self.sha = client.script_load(self.source)
            return redis.Redis.execute_command(client, "EVALSHA", self.sha, 0, *args)
