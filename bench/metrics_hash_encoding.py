"""Redis CPU per job with a grown metrics hash, compact (ziplist) against hash table.

Each job's scripts (start, finish) add to ``<prefix>:metrics``, which a deployment fills
with hundreds of fields (kinds × stages × buckets, owners). Redis 6.2 keeps a hash of up
to 512 fields compact, where every HINCRBY scans it; the embedded Redis now turns it into
a hash table past 128 fields (Redis 7's default). Rounds alternate the two settings on one
private embedded Redis; each round fills the metrics hash with ``--fields`` fields, then
runs ``--jobs`` no-op jobs' scripts (create; start + finish with the held report, as row
1's probe does) and reads the redis-server's CPU and Redis' own EVALSHA time per job.

    PYTHONPATH=src:. .venv/bin/python -m bench.metrics_hash_encoding --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import uuid

import psutil
import redis

from bench.infra import private_redis
from morag.services.jobs import JobStore, ProgressReport, TaskStatus, utcnow


def one_round(client: redis.Redis, server: psutil.Process, entries: int, fields: int, n: int):
    client.flushall()
    client.config_set("hash-max-ziplist-entries", entries)
    store = JobStore(client, "mh", 3600)
    client.hset("mh:metrics", mapping={f"h|stage|k{i % 5}|s{i}|le": 1 for i in range(fields)})
    ids = [str(uuid.uuid4()) for _ in range(n)]
    for task_id in ids:
        store.create(task_id, kind="system", queue="celery", task_name="morag.probe")
    client.config_resetstat()
    before = sum(server.cpu_times()[:2])
    for task_id in ids:
        store.start(task_id, worker="w:1:x", lease_seconds=60, max_attempts=3, kind="system")
        report = ProgressReport(1.0, "probing", "step 1 of 1", utcnow(), {"step": 1})
        store.finish(
            task_id,
            TaskStatus.SUCCESS,
            message="done",
            worker="w:1:x",
            summary={"steps": 1},
            result={"steps": 1},
            last_report=report,
        )
    redis_us = (sum(server.cpu_times()[:2]) - before) / n * 1e6
    evalsha_us = client.info("commandstats")["cmdstat_evalsha"]["usec"] / n
    encoding = client.object("encoding", "mh:metrics").decode()
    return redis_us, evalsha_us, encoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--fields", type=int, default=300)
    args = parser.parse_args()
    with private_redis() as (_, client, proc):
        results: dict[int, list[tuple[float, float, str]]] = {512: [], 128: []}
        for i in range(args.rounds):
            for entries in (512, 128) if i % 2 == 0 else (128, 512):
                row = one_round(client, proc, entries, args.fields, args.jobs)
                results[entries].append(row)
    for entries, rows in results.items():
        cpu = statistics.median(r[0] for r in rows)
        evalsha = statistics.median(r[1] for r in rows)
        print(
            f"hash-max-ziplist-entries {entries}: metrics hash {rows[0][2]} ({args.fields} fields),"
            f" Redis CPU {cpu:.0f} µs/job, EVALSHA {evalsha:.1f} µs/job"
        )


if __name__ == "__main__":
    main()
