"""GET /metrics scrape time with many job records: python -m bench.metrics_scrape [--jobs N]

Fills a fresh key prefix of the Redis at MORAG_REDIS_URL (default: the local one) with N
job records made by the real scripts (a third finished, by kind), messages on all five
queues, one live worker entry, then times scrapes of a ``morag api`` process over HTTP
and prints p50/p99. The prefix is deleted afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis
from tests.harness import flush_namespace, start_api


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    from morag.core.config import ALL_QUEUES
    from morag.services.jobs import JobStore, TaskStatus
    from morag.services.workers import WorkerInfo, WorkerRegistry

    prefix = f"bench-metrics-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(args.redis)
    store = JobStore(client, prefix, 3600)
    kinds = ["document", "audio", "video", "web", "system"]
    try:
        started = time.perf_counter()
        for i in range(args.jobs):
            kind = kinds[i % 5]
            task_id = f"job-{i}"
            store.create(task_id, kind=kind, queue=ALL_QUEUES[i % 5], task_name="x")
            if i % 3 == 0:
                store.start(task_id, worker="w", lease_seconds=60, max_attempts=3, kind=kind)
                store.finish(task_id, TaskStatus.SUCCESS if i % 2 else TaskStatus.FAILURE)
        for queue in ALL_QUEUES:
            client.rpush(f"{prefix}:{queue}", *[b'{"headers": {"id": "x"}}'] * 200)
        WorkerRegistry(client, prefix).announce(
            WorkerInfo("w@bench", list(ALL_QUEUES), 2, 1, "now", "now"), ttl_seconds=3600
        )
        print(f"filled {args.jobs} jobs in {time.perf_counter() - started:.0f} s; "
              f"{client.dbsize()} keys in the database", file=sys.stderr)
        env = {"MORAG_REDIS_URL": args.redis, "MORAG_KEY_PREFIX": prefix,
               "MORAG_BROKER_NAMESPACE": f"{prefix}:", "MORAG_LOG_LEVEL": "WARNING",
               "MORAG_DATA_DIR": tempfile.mkdtemp(prefix="bench-metrics-")}
        import os

        base, server = start_api(Path(env["MORAG_DATA_DIR"]) / "api.log", {**os.environ, **env})
        try:
            times = []
            with httpx.Client(base_url=base) as http:
                for _ in range(20):
                    http.get("/metrics")  # warm-up
                for _ in range(args.scrapes):
                    t0 = time.perf_counter()
                    answer = http.get("/metrics")
                    times.append((time.perf_counter() - t0) * 1000)
                    assert answer.status_code == 200
            times.sort()
            p99 = times[int(len(times) * 0.99) - 1]
            print(f"GET /metrics, {args.jobs} job records, 5 queues: p50 "
                  f"{statistics.median(times):.2f} ms, p99 {p99:.2f} ms, "
                  f"{len(answer.content)} bytes")
        finally:
            server.stop()
    finally:
        flush_namespace(client, prefix)


if __name__ == "__main__":
    main()
