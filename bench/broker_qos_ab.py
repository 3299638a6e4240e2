"""A/B of a delivery's bookkeeping: kombu's Redis transport against morag's (core/broker.py).

With acks on, kombu records each delivery in its ``unacked`` hash and index and removes
it at the ack, each a MULTI/EXEC pipeline; morag's transport makes each one script call.
Each round takes ``--jobs`` messages off a queue (``get`` without auto-ack, then ``ack``)
through one transport, against one private embedded Redis (AOF on, as the bench runs it);
rounds alternate. Per message: this process's CPU (the worker main process's share),
the redis-server's CPU, and Redis commands. The medians and the median of the paired
morag/kombu ratios are printed.

    PYTHONPATH=src:. .venv/bin/python -m bench.broker_qos_ab --rounds 21
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import redis
from kombu import Connection, Exchange, Queue

from bench.infra import private_redis
from bench.stats import print_paired

PREFIX = "ab:"


def one_round(url: str, transport: str | None, client: redis.Redis, n: int, server: Any) -> dict:
    queue = Queue("ab", Exchange("ab"), "ab")
    options = {"global_keyprefix": PREFIX}
    with Connection(url, transport=transport, transport_options=options) as conn:
        channel = conn.channel()
        producer = conn.Producer(channel)
        body = {"kwargs": {"steps": 1}, "pad": "x" * 600}  # about a task message's size
        for _ in range(n + 5):
            producer.publish(body, exchange=queue.exchange, routing_key="ab", declare=[queue])
        bound = queue(channel)
        for _ in range(5):  # scripts loaded, connection warm
            message = bound.get(no_ack=False)
            message.ack()
        client.config_resetstat()
        redis_before = sum(server.cpu_times()[:2])
        cpu_before = time.process_time()
        for _ in range(n):
            message = bound.get(no_ack=False)
            message.ack()
        client_us = (time.process_time() - cpu_before) / n * 1e6
        redis_us = (sum(server.cpu_times()[:2]) - redis_before) / n * 1e6
        stats = client.info("commandstats")
        bound.delete()
    left = client.hlen(f"{PREFIX}unacked") + client.zcard(f"{PREFIX}unacked_index")
    if left:
        raise RuntimeError(f"{left} deliveries left unacked")
    calls = sum(s["calls"] for k, s in stats.items() if k != "cmdstat_config")
    return {"client_us": client_us, "redis_cpu_us": redis_us, "commands": calls / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    with private_redis() as (server, client, proc):
        socket = str(server.socket_path)
        sides = {
            "kombu": (f"redis+socket://{socket}", None),
            "morag": (f"socket://{socket}", "morag.core.broker:UnixSocketTransport"),
        }
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
        for i in range(args.rounds):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for name in order:
                url, transport = sides[name]
                results[name].append(one_round(url, transport, client, args.jobs, proc))
    print_paired(results, "kombu", "morag", ("client_us", "redis_cpu_us", "commands"))


if __name__ == "__main__":
    main()
