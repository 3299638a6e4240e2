"""The registry of live workers: each worker announces itself every few seconds.

A worker writes ``<prefix>:worker:<hostname>`` (its queues, concurrency, pid) with a TTL
of three announce intervals, so a dead worker drops out on its own, and its hostname in
``<prefix>:workers`` (scored by that expiry), so reading the registry never scans the
keyspace (a SCAN walks every job record). Reading it is two Redis round trips, which
keeps health checks, queue stats and metrics fast whether or not workers run
(remote-control ``inspect`` waits its full timeout when nobody answers).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis

from morag.core.keys import RedisKeys


@dataclass
class WorkerInfo:
    hostname: str
    queues: list[str]
    concurrency: int
    pid: int
    started_at: str
    seen_at: str


#: Seconds an index entry outlives its announcement: hosts' clocks may disagree this much
#: (the key's own TTL, kept by Redis, decides whether the worker is live).
INDEX_SLACK_SECONDS = 300


class WorkerRegistry:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.keys = RedisKeys(prefix)
        self._announced: set[tuple[str, str]] = set()  # (hostname, started_at) counted

    def announce(self, info: WorkerInfo, ttl_seconds: float) -> None:
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(
            self.keys.worker(info.hostname), json.dumps(asdict(info)), px=int(ttl_seconds * 1000)
        )
        pipe.zadd(self.keys.worker_index, {info.hostname: now + ttl_seconds})
        pipe.zremrangebyscore(self.keys.worker_index, "-inf", now - INDEX_SLACK_SECONDS)
        start = (info.hostname, info.started_at)
        if start not in self._announced:  # this worker's first announcement: it (re)started
            pipe.hincrby(self.keys.metrics, "c|worker|started", 1)
        pipe.execute()
        self._announced.add(start)

    def withdraw(self, hostname: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(self.keys.worker(hostname))
        pipe.zrem(self.keys.worker_index, hostname)
        pipe.execute()

    def live_workers(self) -> list[WorkerInfo]:
        names = self.redis.zrangebyscore(
            self.keys.worker_index, time.time() - INDEX_SLACK_SECONDS, "+inf"
        )
        if not names:
            return []
        keys = [self.keys.worker(name.decode()) for name in names]  # type: ignore[union-attr]
        return [WorkerInfo(**json.loads(raw)) for raw in self.redis.mget(keys) if raw]

    @staticmethod
    def consumers_by_queue(workers: list[WorkerInfo], queues: list[str]) -> dict[str, list[str]]:
        """Hostnames of the workers consuming each queue."""
        by_queue: dict[str, list[str]] = {q: [] for q in queues}
        for worker in workers:
            for queue in worker.queues:
                by_queue.setdefault(queue, []).append(worker.hostname)
        return by_queue

    @staticmethod
    def describe(workers: list[WorkerInfo]) -> list[dict[str, Any]]:
        return [asdict(w) for w in workers]
