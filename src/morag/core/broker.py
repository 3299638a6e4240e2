"""kombu's Redis transport with one reused client per channel.

kombu's Redis channel builds a new redis-py client object for every message it publishes
(tasks, task events) and for every ack (``Channel.conn_or_acquire``). Building one costs
more than sending the command it is built for: with task events on, 16% of a worker's
main process went to it (bench/ row 1). A redis-py client is thread-safe (each command
takes a connection from the pool), so one client per channel and pool does the same work.

It also keeps a worker alive when Redis goes away (Celery 5.7 / kombu 5.7): Celery's
``Consumer.on_connection_error_after_connected`` collects the connection, which clears the
transport's connection info, then closes it; closing the channel restores its unacked
messages, which needs a new pool built from that cleared info, and the ``AttributeError``
that followed was fatal to the worker. Here it is a connection error, which the close
ignores: the messages stay in the unacked hash, and recovery or the visibility timeout
delivers them again.

Celery is pointed at these classes with its ``broker_transport`` setting
(``celery_app.celery_config``); nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):  # type: ignore[misc]
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


class UnixSocketTransport(Transport):
    """For ``socket:///path`` URLs: the channel reads the socket path from the URL itself,
    as kombu's own ``redis+socket://`` does."""

    can_parse_url = True


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
