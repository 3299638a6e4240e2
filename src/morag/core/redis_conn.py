"""Redis clients: one connection pool per process and URL."""

from __future__ import annotations

import threading

import redis

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def get_redis(url: str) -> redis.Redis:
    """A client sharing one pool per URL in this process (cheap to call on every request)."""
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = redis.Redis.from_url(
                    url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30
                )
                _clients[url] = client
    return client


def reset_clients() -> None:
    """Forget pooled clients (after fork: a child must not share its parent's sockets)."""
    with _lock:
        _clients.clear()
