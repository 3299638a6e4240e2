"""The registry of live workers: each worker announces itself every few seconds.

A worker writes ``<prefix>:worker:<hostname>`` (its queues, concurrency, pid) with a TTL
of three announce intervals, so a dead worker drops out on its own. Reading the registry
is one Redis round trip, which keeps health checks and queue stats fast whether or not
workers run (remote-control ``inspect`` waits its full timeout when nobody answers).
"""

from __future__ import annotations

import json
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


class WorkerRegistry:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.keys = RedisKeys(prefix)

    def announce(self, info: WorkerInfo, ttl_seconds: float) -> None:
        self.redis.set(
            self.keys.worker(info.hostname), json.dumps(asdict(info)), px=int(ttl_seconds * 1000)
        )

    def withdraw(self, hostname: str) -> None:
        self.redis.delete(self.keys.worker(hostname))

    def live_workers(self) -> list[WorkerInfo]:
        keys = list(self.redis.scan_iter(match=self.keys.worker("*"), count=500))
        if not keys:
            return []
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
