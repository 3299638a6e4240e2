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
their own.

Celery is pointed at these classes with its ``broker_transport`` setting
(``celery_app.celery_config``); nothing else changes. The connection's URI still says
``redis://`` or ``redis+socket://`` (not the class path), because tools pick their broker
client by that scheme: Flower answered its queue lengths with 404 "'redis' broker is not
supported" for ``morag.core.broker:Transport://``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import redis
from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps
from kombu.utils.url import maybe_sanitize_url

from morag.core.redis_scripts import DirectScript, lua_string

# ARGV: delivery tag, time (epoch s), the message as kombu keeps it for a restore
_DELIVERED = """
redis.call('ZADD', INDEX, ARGV[2], ARGV[1])
redis.call('HSET', UNACKED, ARGV[1], ARGV[3])
"""
# ARGV: delivery tag
_ACKED = """
redis.call('ZREM', INDEX, ARGV[1])
redis.call('HDEL', UNACKED, ARGV[1])
"""


class QoS(kombu_redis.QoS):  # type: ignore[misc]
    """kombu's ack emulation, its two per-delivery writes each one script call."""

    @cached_property
    def _scripts(self) -> tuple[DirectScript, DirectScript]:
        prefix = self.channel.global_keyprefix or ""
        names = (
            f"local INDEX = {lua_string(prefix + self.unacked_index_key)}\n"
            f"local UNACKED = {lua_string(prefix + self.unacked_key)}\n"
        )
        return DirectScript(names + _DELIVERED), DirectScript(names + _ACKED)

    def append(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        stored = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        with self.channel.conn_or_acquire() as client:
            self._scripts[0](client, delivery_tag, time.time(), stored)
        virtual.QoS.append(self, message, delivery_tag)  # kombu's own, without its pipeline

    def ack(self, delivery_tag: str) -> None:
        with self.channel.conn_or_acquire() as client:
            self._scripts[1](client, delivery_tag)
        virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    QoS = QoS
    _shared_client: Any = None

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

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:  # collected: see the module docstring
            raise redis.ConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-any-return]


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """For ``redis://`` URLs (kombu parses the URL)."""

    Channel = Channel


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
