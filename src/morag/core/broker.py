"""kombu's Redis transport with one reused client per channel, and each delivery's
bookkeeping in one script call.

kombu's Redis channel builds a new redis-py client object for every message it publishes
(tasks, task events) and for every ack (``Channel.conn_or_acquire``). Building one costs
more than sending the command it is built for. A redis-py client is thread-safe (each command
takes a connection from the pool), so one client per channel and pool does the same work.

It also keeps a worker alive when Redis goes away (Celery 5.7 / kombu 5.7): Celery's
``Consumer.on_connection_error_after_connected`` collects the connection, which clears the
transport's connection info, then closes it; closing the channel restores its unacked
messages, which needs a new pool built from that cleared info, and the ``AttributeError``
that followed was fatal to the worker. Here it is a connection error, which the close
ignores: the messages stay in the unacked hash, and recovery or the visibility timeout
delivers them again.

With acks on (morag's ``acks_late``), kombu records each delivery in its ``unacked`` hash
and index, and removes it at the ack, each time in a MULTI/EXEC pipeline: four commands
for redis-py to pack and parse, twice per job, in the worker's main process. Here each is
one script call (``QoS``) that writes the same keys and values, as atomically: kombu's
restores (``restore_by_tag``, the visibility timeout, morag's recovery) read them as
their own. The message in that entry is its JSON as it came from the queue, where kombu
encoded the message it had just decoded again.

In a worker, the ack's write rides on the next delivery's script call (``AckBacklog``):
a process whose job just finished takes its next message at once, so under load a job
costs one bookkeeping call, not two. An ack no delivery takes along within
``ACK_DELAY_SECONDS`` is written on its own. The ack is already done for kombu and Celery
(the slot is free); only its removal from the ``unacked`` hash waits. Should the worker
die in that window, the message stays in the hash, and morag's recovery drops it once
past its grace period, its job being final (services/recovery.py): nothing runs twice.

In a worker's event loop, kombu starts every turn by adding each Redis socket to the
loop again (an ``epoll_ctl`` that fails with EEXIST, its exception caught) and builds and
packs its BRPOP anew for every delivery: about 50 µs a job in the main process, which
sets the pace of a worker whose jobs are short. Here a socket the loop already reads for
this transport is left as it is, and each BRPOP is packed once per order of the queues.

A morag task's submission (``apply_async``, tasks/processing.py) hands its job record's
write to the publish (``RecordedPublish``): one script call writes the record, then
pushes the message, where the record's call and kombu's LPUSH were two round trips.

Celery is pointed at these classes with its ``broker_transport`` setting
(``celery_app.celery_config``); nothing else changes. The connection's URI still says
``redis://`` or ``redis+socket://`` (not the class path), because tools pick their broker
client by that scheme: Flower answered its queue lengths with 404 "'redis' broker is not
supported" for ``morag.core.broker:Transport://``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from queue import Empty
from typing import Any

import redis
import structlog
from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads
from kombu.utils.url import maybe_sanitize_url

from morag.core.redis_scripts import DirectScript, lua_string

logger = structlog.get_logger(__name__)

#: How long an ack waits for a delivery to take it along before it is written alone.
ACK_DELAY_SECONDS = 0.01
#: Acks written per script call at most (Lua's ``unpack`` has a limit).
ACKS_PER_CALL = 500

# ARGV: delivery tag, time (epoch s), the message as kombu keeps it for a restore, then
#       the delivery tags of acks not yet written
_DELIVERED = """
redis.call('ZADD', INDEX, ARGV[2], ARGV[1])
redis.call('HSET', UNACKED, ARGV[1], ARGV[3])
if #ARGV > 3 then
  redis.call('ZREM', INDEX, unpack(ARGV, 4))
  redis.call('HDEL', UNACKED, unpack(ARGV, 4))
end
"""
# ARGV: delivery tags
_ACKED = """
redis.call('ZREM', INDEX, unpack(ARGV))
redis.call('HDEL', UNACKED, unpack(ARGV))
"""


class AckBacklog:
    """Acks done for kombu but not yet removed from one ``unacked`` hash.

    One per hash and process, not per channel: acks a lost connection could not write
    are written through the next connection's channel (after a Redis restart), so no
    finished job's message is left in the hash to be delivered again.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tags: list[str] = []
        self.flush_scheduled = False

    def take(self) -> list[str]:
        """Up to ``ACKS_PER_CALL`` of the waiting acks, oldest first."""
        with self.lock:
            tags, self.tags = self.tags[:ACKS_PER_CALL], self.tags[ACKS_PER_CALL:]
            return tags

    def put_back(self, tags: list[str]) -> None:
        with self.lock:
            self.tags[:0] = tags


_backlogs: dict[str, AckBacklog] = {}
_backlogs_lock = threading.Lock()


def ack_backlog(index_key: str) -> AckBacklog:
    with _backlogs_lock:
        return _backlogs.setdefault(index_key, AckBacklog())


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's ack emulation, its per-delivery writes each one script call, an ack's
    write taken along by the next delivery's once ``defer_acks`` is called."""

    #: ``call_later(seconds, callback)`` of the worker's event loop; None: acks are
    #: written at once (a client outside a worker, or a pool without an event loop).
    _call_later: Callable[[float, Callable[[], None]], Any] | None = None

    @cached_property
    def _prefixed_index_key(self) -> str:
        return (self.channel.global_keyprefix or "") + self.unacked_index_key

    @cached_property
    def _scripts(self) -> tuple[DirectScript, DirectScript]:
        prefix = self.channel.global_keyprefix or ""
        names = (
            f"local INDEX = {lua_string(self._prefixed_index_key)}\n"
            f"local UNACKED = {lua_string(prefix + self.unacked_key)}\n"
        )
        return DirectScript(names + _DELIVERED), DirectScript(names + _ACKED)

    @cached_property
    def _backlog(self) -> AckBacklog:
        return ack_backlog(self._prefixed_index_key)

    def defer_acks(self, call_later: Callable[[float, Callable[[], None]], Any]) -> None:
        """Let deliveries take acks along (``call_later`` writes the ones left over)."""
        self._call_later = call_later
        self._backlog.flush_scheduled = False  # a timer of the last connection may be gone
        self._flush_acks_or_keep()  # those a lost connection left (a Redis restart)

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        exchange, routing_key = delivery["exchange"], delivery["routing_key"]
        received = self.channel._received
        if received is not None and received[0] is message._raw:
            # kombu's entry, ``dumps([message, exchange, routing_key])``, made of the
            # message's JSON as it came rather than encoding it again
            item = received[1]
            stored: Any = b"[%s,%s,%s]" % (item, _json(exchange), _json(routing_key))
        else:
            stored = dumps([message._raw, exchange, routing_key])
        acked = self._backlog.take()
        try:
            with self.channel.conn_or_acquire() as client:
                self._scripts[0](client, delivery_tag, time.time(), stored, *acked)
        except BaseException:
            self._backlog.put_back(acked)
            raise
        virtual.QoS.append(self, message, delivery_tag)  # kombu's own, without its pipeline

    def ack(self, delivery_tag: str) -> None:
        backlog = self._backlog
        with backlog.lock:
            backlog.tags.append(delivery_tag)
            schedule = self._call_later is not None and not backlog.flush_scheduled
            backlog.flush_scheduled |= schedule
        if self._call_later is None:
            self.flush_acks()  # no event loop to wait in: written now
        elif schedule:
            self._call_later(ACK_DELAY_SECONDS, self._scheduled_flush)
        virtual.QoS.ack(self, delivery_tag)

    def _scheduled_flush(self) -> None:
        self._backlog.flush_scheduled = False
        self._flush_acks_or_keep()

    def _flush_acks_or_keep(self) -> None:
        """``flush_acks``; with Redis unreachable the acks are kept for the next call."""
        try:
            self.flush_acks()
        except redis.RedisError as exc:
            logger.warning("acks not written yet: Redis unreachable", error=str(exc))

    def flush_acks(self) -> None:
        """Write the acks no delivery has taken along (raises if Redis is unreachable;
        they are kept for the next try)."""
        while acked := self._backlog.take():
            try:
                with self.channel.conn_or_acquire() as client:
                    self._scripts[1](client, *acked)
            except BaseException:
                self._backlog.put_back(acked)
                raise

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        """At the channel's close: the acks waiting are written first, when Redis can be
        reached (else the next connection's channel writes them)."""
        self._flush_acks_or_keep()
        return super().restore_unacked_once(stderr)


@dataclass
class RecordedPublish:
    """A task message about to be published whose job record is written by the publish
    itself (``Channel._put``), in the same Redis call as the message.

    ``write(push)`` writes the record and, with ``push`` (the list's key, the message as
    kombu's JSON), pushes the message after it in the same script call unless identical
    work is active; without, the record alone, for a message kombu publishes its own way
    (written first). It answers the id of the job that does the work (``JobStore.create``).
    """

    task_id: str
    write: Callable[[tuple[str, str] | None], Any]
    written: bool = False
    answer: Any = None  # what ``write`` answered

    @property
    def joined(self) -> bool:
        """Identical work was active: that job does it, and no message was sent."""
        return self.written and self.answer is not None and self.answer != self.task_id

    def record(self, push: tuple[str, str] | None = None) -> None:
        self.answer = self.write(push)
        self.written = True


#: The publish in progress in this context (``publish_recorded`` sets it around Celery's).
recorded_publish: ContextVar[RecordedPublish | None] = ContextVar("recorded_publish", default=None)


def publish_recorded(
    app: Any,
    task_id: str,
    write: Callable[[tuple[str, str] | None], Any],
    publish: Callable[[], Any],
) -> tuple[RecordedPublish, Any]:
    """``publish()`` a task message of ``app`` whose job record ``write`` writes first: on
    morag's transport in the same script call as the message (``Channel._put``); else
    before it, no message then being sent when identical work is active. The record's
    state and what ``publish`` answered."""
    pending = RecordedPublish(task_id, write)
    if app.conf.task_always_eager or app.conf.broker_transport not in TRANSPORTS:
        pending.record()
        return pending, None if pending.joined else publish()
    token = recorded_publish.set(pending)
    try:
        result = publish()
    finally:
        recorded_publish.reset(token)
    if not pending.written:  # no message reached a queue: the record all the same
        pending.record()
    return pending, result


#: Characters of a message's arguments shown to monitors at most (Celery's own limit).
REPR_LIMIT = 1024


def short_repr(value: Any) -> str:
    """``repr(value)``, cut to ``REPR_LIMIT`` characters as Celery's saferepr cuts it."""
    text = repr(value)
    return text if len(text) <= REPR_LIMIT else text[: REPR_LIMIT - 3] + "..."


def publish_options(args: Any, kwargs: Any) -> dict[str, Any]:
    """Celery options for publishing a morag task message: a fifth less of a submission's
    CPU (bench/results/perf-notes.md), the same message sent:

    - what monitors show of the arguments, a plain ``repr``: Celery's ``saferepr`` walks
      them in Python, and morag's are plain JSON values;
    - no queue to declare: morag's queues are direct, so Celery publishes to the queue's
      own list by Redis's anonymous exchange, which reads no binding, and kombu's
      ``maybe_declare`` copied the queue and entered ``Connection.ensure`` on every
      publish only to find it declared already. Workers declare their queues at start.
    """
    return {
        "argsrepr": short_repr(tuple(args or ())),
        "kwargsrepr": short_repr(kwargs or {}),
        "declare": [],
    }


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    _shared_client: Any = None
    _brpop_packed_for: Any = None  # the connection the packed BRPOPs below are for
    _brpop_packed: dict[tuple[Any, ...], Any]
    #: The message being delivered, decoded, and its JSON as it came (``_brpop_read``).
    _received: tuple[Any, bytes] | None = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        shared = self._shared_client
        # A new pool (after a fork or a reconnect) gets a new client.
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared

    def _brpop_start(self, timeout: float | None = None) -> None:
        """kombu's, with the BRPOP for each order of the queues packed once: kombu built
        and packed it anew for every delivery (32 µs a job in a worker's main process)."""
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        connection = self.client.connection
        if self._brpop_packed_for is not connection:  # a new connection: its own packer
            self._brpop_packed_for, self._brpop_packed = connection, {}
        key = (timeout, *queues)  # as many as the rotations of the queues
        command = self._brpop_packed.get(key)
        if command is None:
            keys = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
            args = ["BRPOP", *keys, timeout or 0]
            if self.global_keyprefix:
                args = self.client._prefix_args(args)
            command = self._brpop_packed[key] = connection.pack_command(*args)
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu: None
        connection.send_packed_command(command)

    def _brpop_read(self, **options: Any) -> bool:
        """kombu's, keeping each message's JSON as it came while it is delivered
        (``_received``), for its entry in the unacked hash (``QoS.append``): kombu decoded
        it, then encoded it again there (20 µs a job, 2% of a worker main process's time)."""
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # disconnected, so that the next turn of the loop connects again
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            message = loads(bytes_to_str(item))
            self._received = (message, item if isinstance(item, bytes) else item.encode())
            try:
                self.connection._deliver(message, dest)
            finally:
                self._received = None
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu: a bool or the connection
            self._flush_brpop_reauth()  # kombu's: a re-auth token waits for an idle socket

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        """kombu's, or for a message whose job record is due (``recorded_publish``), the
        record and the message in one script call: one round trip per submission where
        there were two, the record still written before the message."""
        pending = recorded_publish.get()
        if pending is None or pending.written or _task_id(message) != pending.task_id:
            super()._put(queue, message, **kwargs)
            return
        plain = kwargs.get("_publish_batch") is None and queue not in (self._expires or {})
        if plain:  # else kombu pipelines the message with other commands: record first
            priority = self._get_message_priority(message, reverse=False)
            key = (self.global_keyprefix or "") + self._q_for_pri(queue, priority)
            pending.record((key, dumps(message)))
            return
        pending.record()
        if not pending.joined:
            super()._put(queue, message, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:  # collected: see the module docstring
            raise redis.ConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-any-return]


def _json(value: str) -> bytes:
    return json.dumps(value).encode()


def _task_id(message: dict[str, Any]) -> Any:
    """The task id of a Celery message (protocol 2 keeps it in the headers)."""
    headers = message.get("headers")
    return headers.get("id") if isinstance(headers, dict) else None


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """For ``redis://`` URLs (kombu parses the URL)."""

    Channel = Channel

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """kombu's, its poll start on every turn of the loop made cheaper (``_poll_start``)."""
        ticks = set(loop.on_tick)
        super().register_with_event_loop(connection, loop)
        kombus = [
            tick
            for tick in set(loop.on_tick) - ticks
            if getattr(tick, "__qualname__", "").endswith(
                "register_with_event_loop.<locals>.on_poll_start"
            )
        ]
        if len(kombus) == 1:  # else a kombu this was not written for: its own stays
            loop.on_tick.discard(kombus[0])
            loop.on_tick.add(self._poll_start(loop))

    def _poll_start(self, loop: Any) -> Callable[[], None]:
        """kombu's poll start without re-adding, on every turn, each Redis socket the loop
        already reads with this transport (each re-add an ``epoll_ctl`` that fails with
        EEXIST, and the exception caught: 16 µs a job in a worker's main process)."""
        cycle: Any = self.cycle  # set by kombu before this is called
        readers, on_readable = loop.readers, self.on_readable

        def on_poll_start() -> None:
            cycle.on_poll_start()  # sends BRPOP and SUBSCRIBE where due
            for fd in cycle.fds:
                if readers.get(fd) != (on_readable, (fd,)):
                    loop.add_reader(fd, on_readable, fd)

        return on_poll_start


# Connection.as_uri() and info() show a transport's name through this table, as the URI's
# scheme; kombu maps its own implementation names to theirs here (pyamqp -> amqp). It names
# these classes only: unlike overriding kombu's "redis" alias, it leaves the transport of
# other apps in the process (the bench's bare-Celery baseline) as it was.
kombu_connection.resolve_aliases[f"{__name__}:Transport"] = "redis"
kombu_connection.resolve_aliases[f"{__name__}:UnixSocketTransport"] = "redis"


class UnixSocketTransport(Transport):
    """For ``socket:///path`` URLs: the channel reads the socket path from the URL itself,
    as kombu's own ``redis+socket://`` does."""

    can_parse_url = True

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The URL as given to morag, ``redis+socket:///path`` (kombu's hook for how a
        transport that parses its own URL shows it)."""
        shown = "redis+" + uri
        return shown if include_password else str(maybe_sanitize_url(shown, mask))


#: ``broker_transport`` of an app on morag's transport (``transport_for``).
TRANSPORTS = frozenset({f"{__name__}:Transport", f"{__name__}:UnixSocketTransport"})


def transport_for(broker_url: str) -> tuple[str, str]:
    """(broker URL, transport class path) for Celery's ``broker_url``/``broker_transport``.

    A ``redis+socket://`` URL names its transport in the scheme, which would override
    ``broker_transport``; it is given as ``socket://`` instead, with the socket transport.
    Other schemes (``rediss://`` with its TLS checks, sentinel, ``amqp://``…) keep kombu's
    own transport (``""``).
    """
    if broker_url.startswith("redis+socket://"):
        return "socket://" + broker_url[len("redis+socket://") :], f"{__name__}:UnixSocketTransport"
    if broker_url.startswith("redis://"):
        return broker_url, f"{__name__}:Transport"
    return broker_url, ""
