"""Row 10 (group ``metrics``): ``GET /metrics`` scrape time with many job records.

Fills a key namespace of its own with N job records made by the real job scripts
(``JobStore.create``, and ``start`` + ``finish`` for a third of them, by kind), 200
messages on each of the five queues and one live worker entry, then times scrapes of a
``morag api`` process serving that namespace, one after another over one keep-alive
connection. The baseline, interleaved with it, is the same scrape of a second API whose
namespace has the same queues and worker and a hundredth of the records (every series
there too): a scrape reads counters and gauges, never the records, so the ratio shows
what the records cost it.

Also here: the light HTTP client the observability rows time with (``Http``), and the
scraper that hits ``/metrics`` every second while row 1 runs (group ``scraped``).

Alone, against any Redis: ``python -m bench.metrics_scrape [--jobs N] [--redis URL]``.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import redis

from bench.infra import Bench
from bench.report import Row, paired_ratios
from bench.stats import percentile, summary

KINDS = ("document", "audio", "video", "web", "system")
QUEUE_MESSAGES = 200  # per queue


class Http:
    """Sequential GETs over one keep-alive connection (``http.client``: a fraction of
    httpx's CPU per request, which the servers measured would otherwise share)."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(base)
        self.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
        self.headers = headers or {}

    def get(self, path: str) -> tuple[int, bytes, float]:
        """Status, body and milliseconds from sending the request to the body's last byte
        (sent again on a new connection if the server closed an idle one: uvicorn does
        after 5 s)."""
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                self.conn.request("GET", path, headers=self.headers)
                response = self.conn.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, ConnectionError):
                self.conn.close()
                if attempt == 2:
                    raise
                continue
            return response.status, body, (time.perf_counter() - started) * 1000
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


class Scraper:
    """A thread scraping ``/metrics`` every ``interval`` seconds, as Prometheus would."""

    def __init__(self, base: str, interval: float = 1.0) -> None:
        self.base = base
        self.interval = interval
        self.times: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-scraper", daemon=True)

    def _run(self) -> None:
        client = Http(self.base)
        due = time.perf_counter()
        try:
            while not self._stop.is_set():
                status, _, ms = client.get("/metrics")
                self.times.append(ms)
                self.failures += status != 200
                due += self.interval
                self._stop.wait(max(0.0, due - time.perf_counter()))
        finally:
            client.close()

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(30)


def fill_jobs(client: redis.Redis, prefix: str, jobs: int) -> None:
    """``jobs`` records through the real scripts: all created, a third started and finished
    (success or failure), the kinds and queues in turn; ids are UUIDs, as the API's."""
    from morag.core.config import ALL_QUEUES
    from morag.services.jobs import JobStore, TaskStatus

    store = JobStore(client, prefix, 3600)
    for i in range(jobs):
        kind = KINDS[i % len(KINDS)]
        task_id = str(uuid.uuid4())
        store.create(task_id, kind=kind, queue=ALL_QUEUES[i % len(ALL_QUEUES)], task_name="x")
        if i % 3 == 0:
            store.start(task_id, worker="w", lease_seconds=60, max_attempts=3, kind=kind)
            store.finish(task_id, TaskStatus.SUCCESS if i % 2 else TaskStatus.FAILURE)


def fill_queues(client: redis.Redis, prefix: str) -> None:
    """Messages on each of the five queues and one live worker consuming them all."""
    from morag.core.config import ALL_QUEUES
    from morag.services.workers import WorkerInfo, WorkerRegistry

    for queue in ALL_QUEUES:
        client.rpush(f"{prefix}:{queue}", *[b'{"headers": {"id": "x"}}'] * QUEUE_MESSAGES)
    WorkerRegistry(client, prefix).announce(
        WorkerInfo("w@bench", list(ALL_QUEUES), 2, 1, "now", "now"), ttl_seconds=3600
    )


def drop_namespace(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=5000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def submitted_total(body: bytes) -> float:
    """``morag_jobs_submitted_total`` summed over kinds (the scrape counted every record)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "morag_jobs_submitted_total"
    )


def scrape_times(client: Http, n: int) -> tuple[list[float], bytes]:
    times, body = [], b""
    for _ in range(n):
        status, body, ms = client.get("/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}: {body[:300]!r}")
        times.append(ms)
    return times, body


def run_metrics(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    """Row 10: GET /metrics p50/p99 with ``metrics_jobs`` records against none."""
    n, scrapes, reps = cfg["metrics_jobs"], cfg["metrics_scrapes"], cfg["api_reps"]
    client = bench.client()
    # The baseline has every series the full namespace has (all kinds, states, stages,
    # buckets), from a hundredth of the records: the ratio is what the records cost.
    few_jobs = max(60, n // 100)
    full, few = f"{bench.morag_ns}-metrics", f"{bench.morag_ns}-metrics-few"
    started = time.perf_counter()
    try:
        fill_jobs(client, full, n)
        fill_queues(client, full)
        fill_jobs(client, few, few_jobs)
        fill_queues(client, few)
        fill_seconds = time.perf_counter() - started
        used_memory = client.info("memory")["used_memory"]
        apis = {
            name: bench.start_api(key_prefix=ns, broker_namespace=f"{ns}:")
            for name, ns in (("full", full), ("few", few))
        }
        http = {name: Http(base) for name, (_, base) in apis.items()}
        for side in http.values():
            scrape_times(side, 20)  # warm-up: connections, scripts, first imports
        p50: dict[str, list[float]] = {"full": [], "few": []}
        p99: dict[str, list[float]] = {"full": [], "few": []}
        body = b""
        for rep in range(reps):
            for name in ("full", "few") if rep % 2 == 0 else ("few", "full"):
                times, answer = scrape_times(http[name], scrapes)
                p50[name].append(percentile(times, 50))
                p99[name].append(percentile(times, 99))
                if name == "full":
                    body = answer
        counted = submitted_total(body)
        if counted != n:
            lines = [line for line in body.splitlines() if b"submitted" in line]
            raise RuntimeError(f"the scrape counted {counted} submitted jobs, not {n}: {lines}")
        for side in http.values():
            side.close()
        for service, _ in apis.values():
            bench.stop(service)
    finally:
        drop_namespace(client, full)
        drop_namespace(client, few)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    common = (
        f"{n:,} job records (a third finished) made by the job scripts, {QUEUE_MESSAGES} "
        f"messages on each of the 5 queues, one live worker; {scrapes} sequential scrapes per "
        f"repetition over one keep-alive connection (http.client), {reps} repetitions "
        f"interleaved with the baseline (the same queues and worker, {few_jobs:,} records: "
        "the same series, a hundredth of the records). "
        f"Answer: {len(body):,} bytes, {series} series; the scrape counted all {n:,} "
        f"submissions. Filled in {fill_seconds:.0f} s; Redis used_memory then "
        f"{used_memory / 1e6:.0f} MB."
    )
    return [
        Row(
            key="10a",
            figure=f"GET /metrics p50, {n:,} job records, 5 queues",
            unit="ms",
            value=summary(p50["full"], 2),
            baseline_name=f"same scrape, {few_jobs:,} job records",
            baseline=summary(p50["few"], 2),
            ratio=paired_ratios(p50["full"], p50["few"]),
            target="reported",
            met=None,
            notes=common,
            details={"answer_bytes": len(body), "series": series, "fill_seconds": fill_seconds},
        ),
        Row(
            key="10b",
            figure=f"GET /metrics p99, {n:,} job records, 5 queues",
            unit="ms",
            value=summary(p99["full"], 2),
            baseline_name=f"same scrape, {few_jobs:,} job records",
            baseline=summary(p99["few"], 2),
            ratio=paired_ratios(p99["full"], p99["few"]),
            target="reported",
            met=None,
        ),
    ]


def main() -> None:
    """One API on a fresh namespace of an existing Redis (default: the local one)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    import os

    from tests.harness import start_api

    prefix = f"bench-metrics-{uuid.uuid4().hex[:6]}"
    client = redis.Redis.from_url(args.redis)
    try:
        started = time.perf_counter()
        fill_jobs(client, prefix, args.jobs)
        fill_queues(client, prefix)
        print(
            f"filled {args.jobs} jobs in {time.perf_counter() - started:.0f} s; "
            f"{client.dbsize()} keys in the database",
            file=sys.stderr,
        )
        env = {
            "MORAG_REDIS_URL": args.redis,
            "MORAG_KEY_PREFIX": prefix,
            "MORAG_BROKER_NAMESPACE": f"{prefix}:",
            "MORAG_LOG_LEVEL": "WARNING",
            "MORAG_DATA_DIR": tempfile.mkdtemp(prefix="bench-metrics-"),
        }
        base, server = start_api(Path(env["MORAG_DATA_DIR"]) / "api.log", {**os.environ, **env})
        try:
            scraper = Http(base)
            scrape_times(scraper, 20)
            times, body = scrape_times(scraper, args.scrapes)
            scraper.close()
            print(
                f"GET /metrics, {args.jobs} job records, 5 queues: p50 "
                f"{statistics.median(times):.2f} ms, p99 {percentile(times, 99):.2f} ms, "
                f"{len(body)} bytes"
            )
        finally:
            server.stop()
    finally:
        drop_namespace(client, prefix)


if __name__ == "__main__":
    main()
