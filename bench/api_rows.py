"""Rows 2 and 3 and issue 4's SSE fan-out: the ingestion API as one ``morag api`` process.

Row 2: submissions/s through ``POST /api/v1/ingest/url`` from concurrent clients
(``httpx.AsyncClient`` in this process, one connection per client) with no worker
running (jobs are only queued), against ``process_web_task.apply_async`` of the same
kind of job in a loop in this process. Every URL is distinct (no idempotent replays).

Row 3: status reads/s through ``GET /api/v1/status/{id}`` against Flower's
``GET /api/task/info/{id}`` for the same finished tasks, same client and concurrency.
Flower learns the tasks from the worker's events while they run.

SSE fan-out: many clients each follow one of a few running jobs through
``GET /api/v1/status/{id}/events``; every stream must end with the job's final event;
latency is the client's receive time minus the event's timestamp (live events only).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import datetime
from typing import Any

import httpx

from bench import loadgen
from bench.infra import Bench, wait_for
from bench.report import Row, paired_ratios, skipped
from bench.stats import percentile, summary


def discover(base: str) -> dict[str, set[str]]:
    """The API's paths and their methods, from its OpenAPI document."""
    document = httpx.get(f"{base}/openapi.json", timeout=10).json()
    return {path: {m.upper() for m in ops} for path, ops in document.get("paths", {}).items()}


def ensure_api(bench: Bench) -> tuple[str, dict[str, set[str]]]:
    if "api_base" not in bench.shared:
        # One key follows every stream of the SSE rows (200): past the per-key limit (100
        # by default) the rest would be answered 429.
        service, base = bench.start_api(sse_max_streams_per_owner="1000")
        paths = discover(base)
        bench.shared.update(
            api_service=service,
            api_base=base,
            api_paths=paths,
            api_has_upload="POST" in paths.get("/api/v1/ingest/file", set()),
            api_has_cancel="DELETE" in paths.get("/api/v1/ingest/{task_id}", set()),
        )
    return bench.shared["api_base"], bench.shared["api_paths"]


async def _run_clients(
    base: str, concurrency: int, items: list[Any], send: Any, expect: int
) -> tuple[float, int]:
    """Send every item from ``concurrency`` clients; elapsed seconds and failures."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    failures = 0
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        await asyncio.gather(*(client.get("/health") for _ in range(concurrency)))
        work = iter(items)

        async def loop() -> None:
            nonlocal failures
            for item in work:
                response = await send(client, item)
                if response.status_code != expect:
                    failures += 1
                    if failures == 1:
                        print(f"bench: unexpected {response.status_code}: {response.text[:300]}")

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return time.perf_counter() - started, failures


def run_submissions(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    base, paths = ensure_api(bench)
    if "POST" not in paths.get("/api/v1/ingest/url", set()):
        return [
            skipped(
                "2",
                "submissions/s through POST /api/v1/ingest/url",
                "the API has no POST /api/v1/ingest/url",
                "ratio ≥ 0.5",
            )
        ]
    from morag.tasks.web_tasks import process_web_task

    n, conc = cfg["submissions"], cfg["api_concurrency"]
    run = uuid.uuid4().hex[:6]

    def urls(tag: str) -> list[str]:
        return [f"http://127.0.0.1:9/{run}/{tag}/page-{i}" for i in range(n)]

    def posts(tag: str) -> list[bytes]:
        return [
            loadgen.post_json("/api/v1/ingest/url", {"url": u, "source_type": "web"})
            for u in urls(tag)
        ]

    def direct(tag: str) -> float:
        started = time.perf_counter()
        for url in urls(tag):
            process_web_task.apply_async(kwargs={"url": url, "metadata": {}})
        return time.perf_counter() - started

    async def post(client: httpx.AsyncClient, url: str) -> httpx.Response:
        return await client.post("/api/v1/ingest/url", json={"url": url, "source_type": "web"})

    bench.flush_morag()
    loadgen.run(base, conc, posts("warm")[:300], 202)
    direct("warm-d")
    bench.flush_morag()
    api_rates, direct_rates, failures, examples = [], [], 0, []
    for rep in range(cfg["api_reps"]):
        order = ("api", "direct") if rep % 2 == 0 else ("direct", "api")
        for side in order:
            if side == "api":
                elapsed, failed, some = loadgen.run(base, conc, posts(f"a{rep}"), 202)
                failures += failed
                examples += some
                api_rates.append(n / elapsed)
            else:
                direct_rates.append(n / direct(f"d{rep}"))
            bench.flush_morag()
    # The same with httpx as the client, once: it costs as much CPU as the API itself.
    elapsed, failed = asyncio.run(_run_clients(base, conc, urls("httpx"), post, 202))
    httpx_rate = n / elapsed
    bench.flush_morag()
    ratio = paired_ratios(api_rates, direct_rates)
    load = bench.shared.setdefault("api_load", [])
    load.append(f"{(cfg['api_reps'] + 1) * n + 300} URL submissions")
    return [
        Row(
            key="2",
            figure=f"submissions/s through POST /api/v1/ingest/url, one API process, "
            f"{conc} concurrent clients",
            unit="jobs/s",
            value=summary(api_rates, 1),
            baseline_name="apply_async loop, one process",
            baseline=summary(direct_rates, 1),
            ratio=ratio,
            target="ratio ≥ 0.5",
            met=failures == 0 and ratio["median"] is not None and ratio["median"] >= 0.5,
            notes=f"{n} distinct URLs per repetition over {conc} keep-alive connections of "
            "bench/loadgen.py (a minimal asyncio HTTP/1.1 client); no worker (jobs only "
            f"queued, flushed after); non-202 answers: {failures} {examples[:1]}. With "
            f"httpx.AsyncClient as the client instead (one repetition): {httpx_rate:.0f} "
            "jobs/s: httpx costs ~2 ms CPU per request, as much as the API, on the same CPUs.",
            details={"httpx_client_rate": round(httpx_rate, 1)},
        )
    ]


def run_status_reads(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    base, paths = ensure_api(bench)
    if "GET" not in paths.get("/api/v1/status/{task_id}", set()):
        return [
            skipped(
                "3",
                "status reads/s through GET /api/v1/status/{id}",
                "the API has no GET /api/v1/status/{task_id}",
                "ratio ≥ 1.0",
            )
        ]
    from bench.document_rows import wait_jobs
    from morag.tasks.system_tasks import probe

    flower, flower_base = bench.start_flower()
    worker = bench.start_morag_worker(cfg["worker_concurrency"], queues="celery")
    try:
        time.sleep(1.0)  # Flower's event receiver has connected and seen the worker
        ids = [probe.apply_async(kwargs={"steps": 1}).id for _ in range(cfg["status_tasks"])]
        wait_jobs(bench, ids, timeout=120)
        http = httpx.Client(base_url=flower_base, timeout=10)

        def flower_knows_all() -> bool:
            for task_id in reversed(ids):
                reply = http.get(f"/api/task/info/{task_id}")
                if reply.status_code != 200 or reply.json().get("state") != "SUCCESS":
                    return False
            return True

        wait_for(flower_knows_all, 60, "Flower to know every task", interval=0.5)
        http.close()
        reads = [ids[i % len(ids)] for i in range(cfg["status_reads"])]

        conc = cfg["api_concurrency"]
        api_reads = [loadgen.get(f"/api/v1/status/{t}") for t in reads]
        flower_reads = [loadgen.get(f"/api/task/info/{t}") for t in reads]
        loadgen.run(base, conc, api_reads[:300], 200)
        loadgen.run(flower_base, conc, flower_reads[:300], 200)
        api_rates, flower_rates, failures = [], [], 0
        for rep in range(cfg["api_reps"]):
            order = ("api", "flower") if rep % 2 == 0 else ("flower", "api")
            for side in order:
                if side == "api":
                    elapsed, failed, _ = loadgen.run(base, conc, api_reads, 200)
                    api_rates.append(len(reads) / elapsed)
                else:
                    elapsed, failed, _ = loadgen.run(flower_base, conc, flower_reads, 200)
                    flower_rates.append(len(reads) / elapsed)
                failures += failed

        async def morag_read(client: httpx.AsyncClient, task_id: str) -> httpx.Response:
            return await client.get(f"/api/v1/status/{task_id}")

        async def flower_read(client: httpx.AsyncClient, task_id: str) -> httpx.Response:
            return await client.get(f"/api/task/info/{task_id}")

        httpx_api = len(reads) / asyncio.run(_run_clients(base, conc, reads, morag_read, 200))[0]
        httpx_flower = (
            len(reads) / asyncio.run(_run_clients(flower_base, conc, reads, flower_read, 200))[0]
        )
        bench.shared.setdefault("api_load", []).append(
            f"{(cfg['api_reps'] + 1) * len(reads) + 300} status reads"
        )
    finally:
        bench.stop(worker)
        bench.stop(flower)
        bench.flush_morag()
    ratio = paired_ratios(api_rates, flower_rates)
    return [
        Row(
            key="3",
            figure=f"status reads/s through GET /api/v1/status/{{id}}, {conc} concurrent clients",
            unit="reads/s",
            value=summary(api_rates, 1),
            baseline_name="Flower GET /api/task/info/{id}",
            baseline=summary(flower_rates, 1),
            ratio=ratio,
            target="ratio ≥ 1.0",
            met=failures == 0 and ratio["median"] is not None and ratio["median"] >= 1.0,
            notes=f"{len(reads)} reads per repetition over {len(ids)} finished jobs, {conc} "
            "keep-alive connections of bench/loadgen.py for both servers; failed reads: "
            f"{failures}. With httpx.AsyncClient as the client (one repetition each): API "
            f"{httpx_api:.0f}/s, Flower {httpx_flower:.0f}/s (the client's own ~2 ms CPU per "
            "request dominates both).",
            details={
                "httpx_client_rates": {"api": round(httpx_api), "flower": round(httpx_flower)}
            },
        ),
    ]


def run_sse(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    """Many clients follow running jobs; every stream must see its job's final event."""

    base, paths = ensure_api(bench)
    if "GET" not in paths.get("/api/v1/status/{task_id}/events", set()):
        return [skipped("4c", "SSE fan-out", "the API has no /events endpoint")]
    jobs = cfg["sse_jobs"]
    rows = []
    worker = bench.start_morag_worker(cfg["worker_concurrency"], queues="celery")
    try:
        for key, clients in zip(("4c", "4d"), cfg["sse_clients"], strict=False):
            rows.append(_sse_row(bench, cfg, base, key, clients, jobs))
    finally:
        bench.stop(worker)
        bench.flush_morag()
    return rows


def _sse_row(
    bench: Bench, cfg: dict[str, Any], base: str, key: str, clients: int, jobs: int
) -> Row:
    from morag.tasks.system_tasks import probe

    latencies_p50, latencies_p99, open_times, complete = [], [], [], []
    errors: dict[str, int] = {}
    for _ in range(cfg["reps"]):
        ids = [str(uuid.uuid4()) for _ in range(jobs)]
        for task_id in ids:  # records first, so streams can open before the work starts
            probe.create_job_record(task_id, (), {})
        result = asyncio.run(_follow(base, ids, clients))
        latencies_p50.append(percentile(result["latencies"] or [float("nan")], 50) * 1000)
        latencies_p99.append(percentile(result["latencies"] or [float("nan")], 99) * 1000)
        open_times.append(result["open_seconds"])
        complete.append(result["complete"])
        for error, count in result["errors"].items():
            errors[error] = errors.get(error, 0) + count
        bench.flush_morag()
    bench.shared.setdefault("api_load", []).append(f"{cfg['reps']} × {clients} SSE streams")
    all_complete = all(c == clients for c in complete)
    return Row(
        key=key,
        figure=f"SSE fan-out: {clients} clients following {jobs} running jobs, event "
        "delivery latency p50",
        unit="ms",
        value=summary(latencies_p50, 1),
        target="reported (issue 4); every stream ends with its final event",
        met=all_complete,
        notes=f"p99 {summary(latencies_p99, 1)['median']} ms; streams complete per "
        f"repetition: {complete} of {clients}"
        + (f" (streams broken off: {errors})" if errors else "")
        + f"; all {clients} streams open in "
        f"{summary(open_times, 2)['median']} s; jobs: probe(steps=10, step_seconds=0.1) on "
        "2 worker processes; latency = receive time − event timestamp, live events only.",
        details={"p99_ms": summary(latencies_p99, 1), "complete": complete, "errors": errors},
    )


async def _follow(base: str, ids: list[str], clients: int) -> dict[str, Any]:
    from morag.tasks.system_tasks import probe

    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    latencies: list[float] = []
    complete = 0
    opened = 0
    errors: dict[str, int] = {}
    all_open = asyncio.Event()
    timeout = httpx.Timeout(120, connect=30)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout) as client:

        async def follow(task_id: str) -> None:
            try:
                await follow_one(task_id)
            except (httpx.HTTPError, ValueError) as exc:
                name = type(exc).__name__
                errors[name] = errors.get(name, 0) + 1

        async def follow_one(task_id: str) -> None:
            nonlocal complete, opened
            async with client.stream("GET", f"/api/v1/status/{task_id}/events") as response:
                connected = time.time()
                opened += 1
                if opened == clients:
                    all_open.set()
                event = ""
                async for line in response.aiter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:].strip())
                        ts = datetime.fromisoformat(data["ts"]).timestamp()
                        if ts > connected:
                            latencies.append(time.time() - ts)
                        if event in ("success", "failure", "revoked"):
                            complete += 1
                            return

        started = time.perf_counter()
        tasks = [asyncio.create_task(follow(ids[i % len(ids)])) for i in range(clients)]
        with contextlib.suppress(TimeoutError):  # streams that fail are counted as errors
            await asyncio.wait_for(all_open.wait(), 60)
        open_seconds = time.perf_counter() - started
        for task_id in ids:
            probe.apply_async(kwargs={"steps": 10, "step_seconds": 0.1}, task_id=task_id)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return {
        "latencies": latencies,
        "complete": complete,
        "open_seconds": open_seconds,
        "errors": errors,
    }
