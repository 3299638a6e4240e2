"""Following a job live: its history, then its events as they happen, until it ends.

Every follower of an API process listens through one Redis pub/sub connection
(``EventHub``), subscribed once per followed job. A connection per follower cost a Redis
connect and handshake per stream and an fd each (two per stream with the client's), and
capped a process at its pool (4,096). 2,000 streams from 25 clients, both with
sse-starlette responses: opened in 14-18 s, the API at 217-243 MB, with a connection
each; in 9 s at 194 MB through the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog

from morag.core.errors import TransientError
from morag.core.keys import RedisKeys
from morag.services.jobs import FINAL_STATES

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.client import PubSub

#: Events waiting for one follower that does not keep up; past it the follower ends (its
#: client reconnects with Last-Event-ID and reads them from the history).
INBOX_MAX = 1000
#: Seconds to wait for Redis to confirm a subscription.
SUBSCRIBE_TIMEOUT = 5.0
LOST = "the event stream lost its connection to Redis; reconnect with Last-Event-ID"

_FINAL_VALUES = frozenset(s.value for s in FINAL_STATES)
logger = structlog.get_logger(__name__)


class InboxClosed(Exception):
    """The hub is stopping (the server shuts down): the follower ends quietly."""


class Inbox:
    """The events of one channel for one follower, in the order Redis sent them."""

    __slots__ = ("channel", "_events", "_ready", "_failure", "_closed")

    def __init__(self, channel: bytes) -> None:
        self.channel = channel
        self._events: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._failure: str | None = None
        self._closed = False

    def put(self, raw: bytes) -> None:
        if len(self._events) >= INBOX_MAX:
            self.fail("this stream fell behind its job's events; reconnect with Last-Event-ID")
        else:
            self._events.append(raw)
            self._ready.set()

    def fail(self, reason: str) -> None:
        if self._failure is None:
            self._failure = reason
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self, timeout: float | None) -> bytes | None:
        """The next event; None when ``timeout`` seconds pass first; TransientError when
        the hub lost its connection or this inbox overflowed (events were missed);
        InboxClosed when the hub stops."""
        while True:
            if self._failure is not None:
                raise TransientError(self._failure)
            if self._closed:
                raise InboxClosed
            if self._events:
                return self._events.popleft()
            self._ready.clear()
            if timeout is None:
                await self._ready.wait()
            elif timeout <= 0:
                return None
            else:
                try:
                    async with asyncio.timeout(timeout):  # no task, unlike wait_for
                        await self._ready.wait()
                except TimeoutError:
                    return None
                timeout = 0  # woken: whatever came is taken above, else the time is up


class EventHub:
    """One pub/sub connection, one reader task, every channel the followers listen to.

    A channel is subscribed when its first follower arrives and unsubscribed when its
    last one leaves. If the connection fails, every follower fails with it (each client
    reconnects and reads what it missed from the history) and the next follower opens a
    new connection: nothing is ever missed silently, which redis-py's reconnect and
    re-subscribe would allow (its client here has no retries).
    """

    def __init__(self, redis_url: str, client_name: str) -> None:
        self.redis_url = redis_url
        self.client_name = client_name  # how the connection shows in CLIENT LIST
        self._client: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._inboxes: dict[bytes, set[Inbox]] = {}
        # A channel's subscription is live once Redis confirmed the last SUBSCRIBE sent
        # for it (an earlier one may have been undone by an UNSUBSCRIBE since).
        self._unconfirmed: Counter[bytes] = Counter()
        self._confirmed: dict[bytes, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()

    def followed(self) -> int:
        """Channels subscribed now."""
        return len(self._inboxes)

    async def subscribe(self, channel: str) -> Inbox:
        """An inbox that receives every event published on ``channel`` from now on."""
        name = channel.encode()
        inbox = Inbox(name)
        inboxes, confirmed = self._inboxes.get(name), self._confirmed.get(name)
        if inboxes is not None and confirmed is not None:
            inboxes.add(inbox)
        else:
            self._inboxes[name] = {inbox}
            confirmed = self._confirmed[name] = asyncio.get_running_loop().create_future()
            try:
                pubsub = await self._connected()
                self._unconfirmed[name] += 1
                await pubsub.subscribe(name)
            except BaseException as exc:
                self.unsubscribe(inbox)
                if isinstance(exc, Exception):
                    self._lost(exc)
                raise
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT)
        except BaseException:
            self.unsubscribe(inbox)
            raise
        return inbox

    def unsubscribe(self, inbox: Inbox) -> None:
        inboxes = self._inboxes.get(inbox.channel)
        if inboxes is None or inbox not in inboxes:
            return
        inboxes.discard(inbox)
        if inboxes:
            return
        del self._inboxes[inbox.channel]
        confirmed = self._confirmed.pop(inbox.channel, None)
        if confirmed is not None and not confirmed.done():
            confirmed.cancel()
        if self._pubsub is not None:
            # Sent from a task of its own: callers run in finally blocks, even cancelled.
            task = asyncio.get_running_loop().create_task(
                self._unsubscribe(self._pubsub, inbox.channel)
            )
            task.add_done_callback(_ignore_result)

    async def _unsubscribe(self, pubsub: PubSub, channel: bytes) -> None:
        if pubsub is self._pubsub and channel not in self._inboxes:  # nobody came back
            try:
                await pubsub.unsubscribe(channel)
            except Exception as exc:
                self._lost(exc)

    async def _connected(self) -> PubSub:
        async with self._lock:
            if self._pubsub is None:
                import redis.asyncio as aioredis
                from redis.asyncio.retry import Retry
                from redis.backoff import NoBackoff

                if self._client is None:
                    self._client = aioredis.Redis.from_url(
                        self.redis_url,
                        socket_connect_timeout=2,
                        retry=Retry(NoBackoff(), 0),
                        client_name=self.client_name,
                    )
                pubsub = self._client.pubsub()
                await pubsub.connect()
                self._pubsub = pubsub
                self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))
            return self._pubsub

    async def _read(self, pubsub: PubSub) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                kind, channel = message["type"], message["channel"]
                if kind == "message":
                    for inbox in self._inboxes.get(channel, ()):
                        inbox.put(message["data"])
                elif kind == "subscribe":
                    self._unconfirmed[channel] -= 1
                    if self._unconfirmed[channel] <= 0:
                        del self._unconfirmed[channel]
                        confirmed = self._confirmed.get(channel)
                        if confirmed is not None and not confirmed.done():
                            confirmed.set_result(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if pubsub is self._pubsub:
                self._lost(exc)

    def _detach(self, reason: str) -> tuple[PubSub | None, asyncio.Task[None] | None]:
        """Fail every follower and forget the connection; returns it and its reader."""
        pubsub, reader = self._pubsub, self._reader
        self._pubsub = self._reader = None
        for inboxes in self._inboxes.values():
            for inbox in inboxes:
                inbox.fail(reason)
        for confirmed in self._confirmed.values():
            if not confirmed.done():
                confirmed.set_exception(TransientError(reason))
                confirmed.exception()  # retrieved: no "never retrieved" warning
        self._inboxes.clear()
        self._confirmed.clear()
        self._unconfirmed.clear()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        return pubsub, reader

    def _lost(self, exc: Exception) -> None:
        logger.warning("event hub lost its Redis connection", error=str(exc))
        self._reset(LOST)

    def _reset(self, reason: str) -> None:
        """Fail every follower and drop the connection; the next follower opens one."""
        pubsub, _ = self._detach(reason)
        if pubsub is not None:
            task = asyncio.get_running_loop().create_task(pubsub.aclose())
            task.add_done_callback(_ignore_result)

    def stop_followers(self) -> None:
        """End every follower quietly (the server is shutting down: its clients
        reconnect, to another process or once it is back, and miss nothing)."""
        for inboxes in self._inboxes.values():
            for inbox in inboxes:
                inbox.close()

    async def aclose(self) -> None:
        pubsub, reader = self._detach("the server is stopping")
        if reader is not None:
            with contextlib.suppress(BaseException):
                await reader
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class JobFollower:
    def __init__(self, keys: RedisKeys, redis_url: str) -> None:
        self.keys = keys
        self.redis_url = redis_url
        self.hub = EventHub(redis_url, client_name=f"{keys.prefix}:event-hub")
        self._aio: aioredis.Redis | None = None

    @property
    def aio(self) -> aioredis.Redis:
        """An asyncio client for histories (made in the serving loop); a blocking pool,
        so a burst of new streams waits for a connection."""
        if self._aio is None:
            import redis.asyncio as aioredis

            pool = aioredis.BlockingConnectionPool.from_url(
                self.redis_url, socket_connect_timeout=2, max_connections=64, timeout=10
            )
            self._aio = aioredis.Redis.from_pool(pool)
        return self._aio

    async def aclose(self) -> None:
        await self.hub.aclose()
        if self._aio is not None:
            await self._aio.aclose()
            self._aio = None

    async def open(self, task_id: str, after: str | None = None) -> Following:
        """Follow the job: subscribed to its events, then its history read (in that
        order, so nothing published in between is lost). ``after`` (an event's ``ts``,
        as sent in SSE ids) skips the events up to it."""
        inbox = await self.hub.subscribe(self.keys.channel(task_id))
        try:
            history = await self.aio.lrange(self.keys.history(task_id), 0, -1)
        except BaseException:
            self.hub.unsubscribe(inbox)
            raise
        return Following(self.hub, inbox, history, after)

    async def follow(
        self,
        task_id: str,
        after: str | None = None,
        until: float | None = None,
        heartbeat: float | None = None,
    ) -> AsyncIterator[dict[str, Any] | None]:
        """``open`` then ``Following.events``."""
        following = await self.open(task_id, after)
        async for event in following.events(until, heartbeat):
            yield event


class Following:
    """A followed job: its history, read once subscribed, then its live events."""

    def __init__(self, hub: EventHub, inbox: Inbox, history: list[Any], after: str | None) -> None:
        self.hub = hub
        self.inbox = inbox
        self.history = history
        self.after = after

    def close(self) -> None:
        self.hub.unsubscribe(self.inbox)

    async def events(
        self, until: float | None = None, heartbeat: float | None = None
    ) -> AsyncIterator[dict[str, Any] | None]:
        """The history, then live events, until a final state, until the monotonic time
        ``until`` passes while waiting for an event, or until the server stops. Yields
        None after ``heartbeat`` seconds without an event. Live events the history
        already held (same time stamp and content) are skipped."""
        try:
            last = _ts(self.after) if self.after else None
            seen_at_last: set[bytes | str] = set()
            for raw in self.history:
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
            self.history = []
            while True:
                wait = None if until is None else until - time.monotonic()
                if heartbeat is not None:
                    wait = heartbeat if wait is None else min(wait, heartbeat)
                try:
                    live = await self.inbox.get(wait)
                except InboxClosed:
                    return
                if live is None:
                    if until is not None and time.monotonic() >= until:
                        return  # the caller's time is up
                    yield None
                    continue
                raw = live
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
            self.close()


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
