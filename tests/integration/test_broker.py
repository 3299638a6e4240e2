"""morag's kombu transport (core/broker.py) against a real Redis: messages go and come
back as with kombu's own, through one client per channel instead of one per message."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis
from kombu.utils import json as kombu_json

from morag.core.broker import ACK_DELAY_SECONDS, Transport, UnixSocketTransport, transport_for
from morag.core.celery_app import celery_config, create_celery_app
from morag.core.config import Settings, redis_url_to_celery

pytestmark = pytest.mark.usefixtures("isolated")


def test_transport_for_each_url_form() -> None:
    assert transport_for("redis://h:6380/2") == ("redis://h:6380/2", "morag.core.broker:Transport")
    assert transport_for("redis+socket:///run/r.sock") == (
        "socket:///run/r.sock",
        "morag.core.broker:UnixSocketTransport",
    )
    # TLS and other brokers keep kombu's own transport and their URL
    assert transport_for("rediss://h:6380/0") == ("rediss://h:6380/0", "")
    assert transport_for("amqp://guest@h//") == ("amqp://guest@h//", "")


def test_celery_uses_the_transport_for_tcp_and_socket_urls() -> None:
    tcp = celery_config(Settings(redis_url="redis://example:6380/2"))
    assert tcp["broker_url"] == "redis://example:6380/2"
    assert tcp["broker_transport"] == "morag.core.broker:Transport"
    unix = celery_config(Settings(redis_url="unix:///run/r.sock"))
    assert unix["broker_url"] == "socket:///run/r.sock"
    assert unix["broker_transport"] == "morag.core.broker:UnixSocketTransport"
    tls = celery_config(Settings(redis_url="rediss://example:6380/0"))
    assert tls["broker_transport"] is None


def test_the_connection_shows_the_url_not_the_class_path() -> None:
    """Flower (and other tools) pick their broker client by the URI's scheme."""
    shown = {
        "redis://:secret@example:6380/2": ("redis://:**@example:6380/2", Transport),
        "unix:///run/r.sock": ("redis+socket:///run/r.sock", UnixSocketTransport),
    }
    for redis_url, (uri, transport) in shown.items():
        app = create_celery_app(Settings(redis_url=redis_url))
        with app.connection() as conn:  # not connected: nothing is sent
            assert type(conn.transport) is transport
            assert conn.as_uri() == uri
            assert conn.info()["transport"] == "redis"
    with create_celery_app(Settings(redis_url="redis://:secret@example:6380/2")).connection() as c:
        assert c.as_uri(include_password=True) == "redis://:secret@example:6380/2"
    # Another app's redis URL keeps kombu's own transport.
    with Connection("redis+socket:///run/r.sock") as conn:
        assert type(conn.transport) is kombu_redis.Transport


def test_messages_round_trip_through_one_shared_client(namespace: str) -> None:
    broker_url, transport = transport_for(redis_url_to_celery(os.environ["MORAG_REDIS_URL"]))
    queue = Queue(f"broker-test-{uuid.uuid4().hex[:6]}", Exchange("broker-test"), "k")
    options = {"global_keyprefix": f"{namespace}:"}
    with Connection(broker_url, transport=transport, transport_options=options) as conn:
        assert isinstance(conn.transport, Transport)
        assert isinstance(conn.transport, UnixSocketTransport) == broker_url.startswith("socket")
        channel = conn.channel()
        producer = conn.Producer(channel)
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="k", declare=[queue])
        clients = set()
        for _ in range(3):
            with channel.conn_or_acquire() as client:
                clients.add(id(client))
        assert len(clients) == 1, "one client for every publish and ack of the channel"

        received = []
        for _ in range(3):
            message = queue(channel).get(no_ack=False)
            assert message is not None
            received.append(message.payload["n"])
            message.ack()
        assert received == [0, 1, 2]
        assert queue(channel).get() is None

        # A new pool (after a fork, or the channel's pools were dropped) gets a new client.
        with channel.conn_or_acquire() as before:
            pass
        channel._disconnect_pools()
        with channel.conn_or_acquire() as after:
            assert after is not before and after.connection_pool is channel.pool
            assert after.ping()
        queue(channel).delete()


def test_closing_a_collected_connection_keeps_its_unacked_messages(namespace: str) -> None:
    """Celery 5.7 collects the connection when Redis goes away, then closes it; kombu's own
    transport then raised AttributeError (fatal to the worker) while restoring the unacked
    messages. Here the close succeeds and the messages stay unacked, to be delivered again."""
    from kombu.common import ignore_errors

    broker_url, transport = transport_for(redis_url_to_celery(os.environ["MORAG_REDIS_URL"]))
    queue = Queue(f"broker-test-{uuid.uuid4().hex[:6]}", Exchange("broker-test"), "k")
    prefix = f"{namespace}:"
    options = {"global_keyprefix": prefix}
    with Connection(broker_url, transport=transport, transport_options=options) as producer:
        producer.Producer().publish(
            {"n": 1}, exchange=queue.exchange, routing_key="k", declare=[queue]
        )
    conn = Connection(broker_url, transport=transport, transport_options=options)
    channel = conn.default_channel
    consumer = conn.Consumer([queue], callbacks=[lambda body, message: None], accept=["json"])
    consumer.consume()
    conn.drain_events(timeout=5)
    assert len(channel.qos._delivered) == 1  # delivered, not acked
    # What Consumer.on_connection_error_after_connected leaves behind: the channel's pools
    # dropped on disconnect, and the transport's connection info cleared by collect().
    channel._disconnect_pools()
    conn.transport.client = None
    ignore_errors(conn, conn.close)  # kombu's transport: AttributeError 'hostname'

    direct = redis.Redis.from_url(os.environ["MORAG_REDIS_URL"])
    assert direct.hlen(f"{prefix}unacked") == 1, "the message waits in the unacked hash"


@contextmanager
def _channel_with_messages(prefix: str, count: int) -> Iterator[tuple[Connection, Any, Queue]]:
    """A connection through morag's transport (keys under ``prefix``), a channel, and a
    new queue holding ``count`` messages ``{"n": 0}``, ``{"n": 1}``..."""
    broker_url, transport = transport_for(redis_url_to_celery(os.environ["MORAG_REDIS_URL"]))
    queue = Queue(f"broker-test-{uuid.uuid4().hex[:6]}", Exchange("broker-test"), "k")
    with Connection(
        broker_url, transport=transport, transport_options={"global_keyprefix": prefix}
    ) as conn:
        channel = conn.channel()
        producer = conn.Producer(channel)
        for n in range(count):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key="k", declare=[queue])
        yield conn, channel, queue


def test_deliveries_are_recorded_and_acked_as_kombu_does(namespace: str) -> None:
    """The channel's QoS writes each delivery to kombu's unacked hash and index in one
    script call, in kombu's own format: kombu restores it, and an ack removes both."""
    prefix = f"{namespace}:"
    direct = redis.Redis.from_url(os.environ["MORAG_REDIS_URL"])
    with _channel_with_messages(prefix, 2) as (conn, channel, queue):
        first = queue(channel).get(no_ack=False)
        assert first is not None and first.payload == {"n": 0}
        tag = first.delivery_tag
        assert direct.zscore(f"{prefix}unacked_index", tag) is not None
        stored, exchange, routing_key = kombu_json.loads(direct.hget(f"{prefix}unacked", tag))
        assert (stored, exchange, routing_key) == (first._raw, "broker-test", "k")

        # kombu's own restore reads it back onto the queue (its front) and forgets it
        channel.qos.restore_by_tag(tag)
        assert direct.hlen(f"{prefix}unacked") == 0
        assert direct.zcard(f"{prefix}unacked_index") == 0

        # a Redis that lost its scripts (a restart) is sent them again
        for script in channel.qos._scripts:
            script.sha = "0" * 40
        again = queue(channel).get(no_ack=False)
        assert again is not None and again.payload == {"n": 0}
        assert again.headers.get("redelivered") is True
        assert direct.hexists(f"{prefix}unacked", again.delivery_tag)
        again.ack()
        assert direct.hlen(f"{prefix}unacked") == 0
        assert direct.zcard(f"{prefix}unacked_index") == 0
        second = queue(channel).get(no_ack=False)
        assert second is not None and second.payload == {"n": 1}
        second.ack()
        queue(channel).delete()


def test_a_consumed_message_is_kept_for_a_restore_as_it_came(namespace: str) -> None:
    """A message the event loop consumes (BRPOP) enters the unacked hash as kombu's entry
    ``[message, exchange, routing_key]`` made of the message's JSON as it came, not
    encoded again (``Channel._brpop_read``): kombu reads the entry back and restores it."""
    prefix = f"{namespace}:"
    direct = redis.Redis.from_url(os.environ["MORAG_REDIS_URL"])
    with _channel_with_messages(prefix, 1) as (conn, channel, queue):
        key = f"{prefix}{queue.name}"
        # the message again, in JSON spelled otherwise than kombu's: its text must survive
        compact = kombu_json.dumps(kombu_json.loads(direct.rpop(key)), separators=(",", ":"))
        direct.lpush(key, compact)
        received: list[Any] = []
        consumer = conn.Consumer([queue], callbacks=[lambda body, m: received.append(m)])
        consumer.consume()
        conn.drain_events(timeout=5)
        [message] = received
        assert message.payload == {"n": 0} and channel._received is None
        entry = direct.hget(f"{prefix}unacked", message.delivery_tag)
        assert entry == b'[%s,"broker-test","k"]' % compact.encode()
        assert kombu_json.loads(entry) == [message._raw, "broker-test", "k"]

        channel.qos.restore_by_tag(message.delivery_tag)  # kombu's own restore
        assert direct.hlen(f"{prefix}unacked") == 0
        assert kombu_json.loads(direct.lindex(key, -1))["properties"]["delivery_tag"] == (
            message.delivery_tag
        )
        consumer.cancel()
        queue(channel).delete()


def test_deferred_acks_ride_on_the_next_delivery_or_their_timer(namespace: str) -> None:
    """With ``defer_acks`` (a worker's event loop), an ack is done for kombu at once but
    leaves the unacked hash with the next delivery's script call, or when its timer fires;
    one that could not be written (Redis away) is kept for the next call."""
    prefix = f"{namespace}:"
    direct = redis.Redis.from_url(os.environ["MORAG_REDIS_URL"])
    timers: list[tuple[float, Callable[[], None]]] = []
    with _channel_with_messages(prefix, 4) as (conn, channel, queue):
        channel.qos.defer_acks(lambda delay, callback: timers.append((delay, callback)))

        first = queue(channel).get(no_ack=False)
        first.ack()
        assert first.acknowledged and channel.qos.can_consume()
        assert direct.hexists(f"{prefix}unacked", first.delivery_tag), "not written yet"
        assert [delay for delay, _ in timers] == [ACK_DELAY_SECONDS], "one timer scheduled"

        second = queue(channel).get(no_ack=False)  # takes the first's ack along
        assert not direct.hexists(f"{prefix}unacked", first.delivery_tag)
        assert direct.zscore(f"{prefix}unacked_index", first.delivery_tag) is None
        assert direct.hexists(f"{prefix}unacked", second.delivery_tag)

        second.ack()
        assert len(timers) == 1, "a timer is already due"
        timers.pop()[1]()  # it fires: the ack no delivery took is written alone
        assert direct.hlen(f"{prefix}unacked") == 0
        assert direct.zcard(f"{prefix}unacked_index") == 0

        # Redis unreachable when the timer fires: the ack is kept for the next call.
        third = queue(channel).get(no_ack=False)
        third.ack()
        scripts = channel.qos._scripts
        channel.qos.__dict__["_scripts"] = tuple(_Unreachable() for _ in scripts)
        timers.pop()[1]()
        assert direct.hexists(f"{prefix}unacked", third.delivery_tag)
        channel.qos.__dict__["_scripts"] = scripts
        fourth = queue(channel).get(no_ack=False)
        assert not direct.hexists(f"{prefix}unacked", third.delivery_tag)
        fourth.ack()
        channel.close()  # the close writes what is left
        assert direct.hlen(f"{prefix}unacked") == 0
        queue(conn.channel()).delete()


class _Unreachable:
    """A script call whose Redis is away."""

    def __call__(self, *args: object) -> None:
        raise redis.ConnectionError("Redis is restarting")


def test_the_brpop_sent_is_the_one_kombu_sends(namespace: str) -> None:
    """The channel packs each BRPOP once and sends it again (``Channel._brpop_start``):
    the bytes are those kombu's own sends for the same queues, in the same order."""
    with _channel_with_messages(f"{namespace}:", 3) as (conn, channel, queue):
        other = Queue(f"{queue.name}-2", queue.exchange, "other")
        other(channel).declare()
        received: list[Any] = []
        for consumed in (queue, other):
            channel.basic_consume(consumed.name, True, received.append, consumed.name)
        conn.transport.cycle._client_registered(channel, channel.client, "BRPOP")  # connects
        connection = channel.client.connection
        order = list(channel._queue_cycle.items)
        sent: list[bytes] = []
        send = connection.send_packed_command
        connection.send_packed_command = lambda command, **kw: (
            sent.append(b"".join(command)),
            send(command, **kw),
        )

        def brpop(start: Callable[[], None]) -> bytes:
            channel._queue_cycle.items[:] = order  # each from the same rotation
            sent.clear()
            start()
            channel._brpop_read()  # the reply: one of the messages
            return b"".join(sent)

        kombus = brpop(lambda: kombu_redis.Channel._brpop_start(channel))
        assert kombus.startswith(b"*") and f"{namespace}:{queue.name}".encode() in kombus
        assert brpop(channel._brpop_start) == kombus  # packed
        assert brpop(channel._brpop_start) == kombus  # packed before, sent again
        assert len(received) == 3
        other(channel).delete()
        queue(channel).delete()


def test_the_event_loop_polls_through_the_transports_cheaper_poll_start(namespace: str) -> None:
    """A worker's event loop (kombu's Hub) starts each turn with morag's poll start, which
    adds the Redis sockets to the loop once, not on every turn: messages still come."""
    from kombu.asynchronous import Hub

    with _channel_with_messages(f"{namespace}:", 3) as (conn, channel, queue):
        hub = Hub()
        try:
            received: list[Any] = []
            consumer = conn.Consumer(queue, callbacks=[lambda body, m: received.append(body)])
            consumer.consume()
            conn.transport.register_with_event_loop(conn.connection, hub)
            starts = [tick for tick in hub.on_tick if "on_poll_start" in tick.__qualname__]
            assert [tick.__qualname__ for tick in starts] == [
                "Transport._poll_start.<locals>.on_poll_start"
            ]
            adds: list[int] = []
            add_reader = hub.add_reader
            hub.add_reader = lambda fd, *args: (adds.append(fd), add_reader(fd, *args))
            deadline = time.monotonic() + 10
            while len(received) < 3 and time.monotonic() < deadline:
                hub.run_once()
            assert received == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert len(adds) == len(set(adds)) == 1  # the BRPOP socket, added once
            assert set(adds) <= set(hub.readers)
        finally:
            hub.close()
        queue(channel).delete()
