"""Following a job live: its history, then its events as they happen, until it ends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis

from morag.core.errors import TransientError
from morag.core.keys import RedisKeys
from morag.services.jobs import FINAL_STATES

if TYPE_CHECKING:
    import redis.asyncio as aioredis

#: Event-stream followers per API process. Each holds its own Redis pub/sub connection
#: (simple and independent of every other follower); Redis allows 10,000 clients by default.
MAX_FOLLOWERS = 4096

_FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)


class JobFollower:
    def __init__(self, keys: RedisKeys, redis_url: str) -> None:
        self.keys = keys
        self.redis_url = redis_url
        self._aio: aioredis.Redis | None = None

    @property
    def aio(self) -> aioredis.Redis:
        """An asyncio client for event streams (made in the serving event loop)."""
        if self._aio is None:
            import redis.asyncio as aioredis

            self._aio = aioredis.Redis.from_url(
                self.redis_url,
                socket_connect_timeout=2,
                max_connections=MAX_FOLLOWERS + 32,  # followers plus existence checks
            )
        return self._aio

    async def aclose(self) -> None:
        if self._aio is not None:
            await self._aio.aclose()
            self._aio = None

    async def job_exists(self, task_id: str) -> bool:
        return bool(await self.aio.exists(self.keys.job(task_id)))

    async def follow(self, task_id: str, after: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """The job's history, then its live events, until a final state.

        Subscribes before reading the history so nothing published in between is lost,
        then skips live events the history already held (same time stamp and content).
        ``after`` (an event's ``ts``, as sent in SSE ids) skips events up to it.
        """

        pubsub = self.aio.pubsub()
        try:
            try:
                await pubsub.subscribe(self.keys.channel(task_id))
            except redis.exceptions.MaxConnectionsError:
                raise TransientError(
                    f"this API process already serves {MAX_FOLLOWERS} event streams; "
                    "retry later or poll the status"
                ) from None
            while True:  # the subscription is live once Redis confirms it
                message = await pubsub.get_message(timeout=5.0)
                if message is not None and message["type"] == "subscribe":
                    break
            history = await self.aio.lrange(self.keys.history(task_id), 0, -1)
            last = _ts(after) if after else None
            seen_at_last: set[bytes | str] = set()
            for raw in history:
                event = json.loads(raw)
                ts = _ts(event.get("ts"))
                if last is not None and ts is not None and ts <= last:
                    continue
                if ts is not None and (last is None or ts > last):
                    last, seen_at_last = ts, set()
                seen_at_last.add(raw)
                yield event
                if event.get("state") in _FINAL_VALUES:
                    return
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is None or message["type"] != "message":
                    await asyncio.sleep(0)
                    continue
                raw = message["data"]
                event = json.loads(raw)
                ts = _ts(event.get("ts"))
                if last is not None and ts is not None:
                    if ts < last or (ts == last and raw in seen_at_last):
                        continue  # already sent from the history
                    if ts > last:
                        last, seen_at_last = ts, set()
                seen_at_last.add(raw)
                yield event
                if event.get("state") in _FINAL_VALUES:
                    return
        finally:
            await pubsub.aclose()


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
