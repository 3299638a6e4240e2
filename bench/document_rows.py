"""Row 5 and issue 3's pages/s: documents through morag vs the processor in-process.

morag side: one ``morag worker`` with two pool processes on ``document_processing``; the
batch is submitted through the API (``POST /api/v1/ingest/file``, concurrent uploads) when
the API has that endpoint, else with ``process_document_task.apply_async`` (the row says
which). Timed from the first submission to the last job's ``finished_at``.

Baseline: ``process_document`` called on the same files by ``multiprocessing.Pool(2)``
(fork), warmed up like the worker (every converter imported, one file of each kind run).

What a job includes here: the upload (API side), the job record, the queue, the worker's
conversion to Markdown and chunking, and the result written back; the same work as the
baseline, plus what morag adds around it. Jobs are submitted with ``options.index`` false
(the upload's ``index=false`` field), so they do not embed or index their chunks, which a
user's job does by default: that part is measured by the ``search`` group (row s7, chunks
embedded and indexed per second through jobs against the model in-process).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from bench.infra import Bench
from bench.inputs import make_documents, make_pdfs
from bench.report import Row, paired_ratios
from bench.stats import summary

FINAL = {b"success", b"failure", b"revoked"}


def _process_one(path: str) -> int:
    from morag.processors.document import process_document

    return len(process_document(Path(path)).chunks)


def _warm(paths: list[str]) -> None:
    for path in paths:
        _process_one(path)


def _init_child(paths: list[str]) -> None:
    """A Pool process: default signal handling (not the benchmark's), then warm up."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _warm(paths)


def wait_jobs(bench: Bench, ids: list[str], timeout: float) -> tuple[float, dict[bytes, int]]:
    """Wait until every job is final; the latest ``finished_at`` (epoch s) and state counts.

    The timing comes from the records, so polling can be sparse (it shares the CPUs with
    what it measures): every 50 ms, only the jobs not yet final.
    """
    client = bench.client()
    prefix = f"{bench.morag_ns}:job:"
    pending = list(ids)
    finished: dict[str, tuple[bytes, bytes]] = {}
    deadline = time.monotonic() + timeout
    while pending:
        pipe = client.pipeline(transaction=False)
        for task_id in pending:
            pipe.hmget(prefix + task_id, "state", "finished_at")
        still = []
        for task_id, (state, finished_at) in zip(pending, pipe.execute(), strict=True):
            if state in FINAL:
                finished[task_id] = (state, finished_at)
            else:
                still.append(task_id)
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} of {len(ids)} jobs not final in {timeout} s")
            time.sleep(0.05)
    counts: dict[bytes, int] = {}
    for state, _ in finished.values():
        counts[state] = counts.get(state, 0) + 1
    last = max(datetime.fromisoformat(f.decode()).timestamp() for _, f in finished.values())
    return last, counts


class DocumentSubmitter:
    """Submits a document job through the API when it can, else through the task."""

    def __init__(self, api_base: str | None) -> None:
        self.api_base = api_base
        self.via = "API POST /api/v1/ingest/file" if api_base else "process_document_task"

    def submit_all(self, paths: list[Path], concurrency: int = 8) -> list[str]:
        if not self.api_base:
            from morag.tasks.document_tasks import process_document_task

            return [
                process_document_task.apply_async(
                    kwargs={
                        "file_path": str(p),
                        "source_type": "document",
                        "options": {"index": False},
                    }
                ).id
                for p in paths
            ]
        return asyncio.run(self._upload_all(paths, concurrency))

    async def _upload_all(self, paths: list[Path], concurrency: int) -> list[str]:
        import httpx

        semaphore = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=self.api_base, timeout=60) as client:

            async def one(path: Path) -> str:
                async with semaphore:
                    response = await client.post(
                        "/api/v1/ingest/file",
                        files={"file": (path.name, path.read_bytes())},
                        data={"source_type": "document", "index": "false"},
                    )
                    if response.status_code != 202:
                        raise RuntimeError(
                            f"upload refused: {response.status_code} {response.text}"
                        )
                    return str(response.json()["task_id"])

            return list(await asyncio.gather(*(one(p) for p in paths)))


class _CpuMeter:
    """CPU seconds of each process taking part: API, worker (main + pool), Redis, Pool(2),
    and this process (the client)."""

    def __init__(self, bench: Bench, worker: Any, pool: Any) -> None:
        self.procs = {"worker_main": worker.pid, "redis": bench.redis_server.process.pid}
        api = bench.shared.get("api_service")
        if api is not None:
            self.procs["api"] = api.pid
        self.worker = worker
        self.pool = pool

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            return 0.0
        return t.user + t.system

    def snapshot(self) -> dict[str, float]:
        shot = {name: self._cpu(pid) for name, pid in self.procs.items()}
        main = psutil.Process(self.worker.pid).cpu_times()
        shot["worker_pool"] = main.children_user + main.children_system
        shot["worker_pool"] += sum(self._cpu(pid) for pid in self.worker.children())
        shot["pool"] = sum(self._cpu(p.pid) for p in self.pool._pool)
        shot["client"] = self._cpu(os.getpid())
        return shot

    @staticmethod
    def per_unit(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
        return {k: (after[k] - before[k]) / n * 1000 for k in before}


def _median_cpu(samples: list[dict[str, float]]) -> dict[str, float]:
    import statistics

    used = {k: round(statistics.median(s[k] for s in samples), 1) for k in samples[0]}
    return {k: v for k, v in used.items() if v >= 0.1}


def _through_morag(bench: Bench, submitter: DocumentSubmitter, paths: list[Path]) -> float:
    started = time.time()
    ids = submitter.submit_all(paths)
    if len(set(ids)) != len(paths):
        raise RuntimeError(f"{len(paths)} submissions made only {len(set(ids))} jobs")
    last, counts = wait_jobs(bench, ids, timeout=300)
    if counts.get(b"success", 0) != len(ids):
        raise RuntimeError(f"document jobs did not all succeed: {counts}")
    return last - started


def _in_process(pool: Any, paths: list[Path]) -> float:
    started = time.perf_counter()
    pool.map(_process_one, [str(p) for p in paths], chunksize=1)
    return time.perf_counter() - started


def run_documents(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    reps = cfg["reps"]
    docs = make_documents(bench.files_dir / "docs", cfg["documents"])
    pdfs = make_pdfs(bench.files_dir / "pdfs", cfg["pdf_count"], cfg["pdf_pages"])
    pages = cfg["pdf_count"] * cfg["pdf_pages"]
    warm = [str(p) for p in docs[:5]] + [str(pdfs[0])]

    from bench.api_rows import ensure_api

    ensure_api(bench)
    api_base = bench.shared["api_base"] if bench.shared["api_has_upload"] else None
    submitter = DocumentSubmitter(api_base)
    worker = bench.start_morag_worker(cfg["worker_concurrency"], queues="document_processing")
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(cfg["worker_concurrency"], initializer=_init_child, initargs=(warm,))
    task_submitter = DocumentSubmitter(None)
    sides = ["api", "task", "base"] if api_base else ["task", "base"]
    meter = _CpuMeter(bench, worker, pool)
    rates: dict[str, dict[str, list[float]]] = {s: {"docs": [], "pages": []} for s in sides}
    cpu: dict[str, dict[str, list[dict[str, float]]]] = {
        s: {"docs": [], "pages": []} for s in sides
    }
    try:
        # Warm the worker's two children the same way (one of each kind, twice).
        _through_morag(bench, task_submitter, [Path(p) for p in warm * 2])
        pool.map(_warm, [warm, warm], chunksize=1)
        for rep in range(reps):
            order = sides[rep % len(sides) :] + sides[: rep % len(sides)]
            for batch, files, units in (("docs", docs, len(docs)), ("pages", pdfs, pages)):
                for side in order:
                    before = meter.snapshot()
                    if side == "base":
                        elapsed = _in_process(pool, files)
                    else:
                        chosen = submitter if side == "api" else task_submitter
                        elapsed = _through_morag(bench, chosen, files)
                    cpu[side][batch].append(meter.per_unit(before, meter.snapshot(), len(files)))
                    rates[side][batch].append(units / elapsed)
                bench.flush_morag()
    finally:
        pool.terminate()
        pool.join()
        bench.stop(worker)
    main_side = "api" if api_base else "task"
    doc_m, page_m = rates[main_side]["docs"], rates[main_side]["pages"]
    doc_b, page_b = rates["base"]["docs"], rates["base"]["pages"]
    cpu_note = {
        batch: {side: _median_cpu(cpu[side][batch]) for side in sides}
        for batch in ("docs", "pages")
    }
    task_note = ""
    if api_base:
        task_note = (
            f" Without the API (process_document_task.apply_async from this process): "
            f"{summary(rates['task']['docs'], 2)['median']} docs/s, ratio "
            f"{paired_ratios(rates['task']['docs'], doc_b)['median']}; "
            f"{summary(rates['task']['pages'], 1)['median']} pages/s, ratio "
            f"{paired_ratios(rates['task']['pages'], page_b)['median']}."
        )
    doc_ratio = paired_ratios(doc_m, doc_b)
    page_ratio = paired_ratios(page_m, page_b)
    kinds = "md, txt, html, 2-page pdf, docx (20 each)"
    return [
        Row(
            key="5",
            figure=f"documents/s, batch of {len(docs)} mixed small documents, 2 worker processes",
            unit="docs/s",
            value=summary(doc_m, 2),
            baseline_name="process_document in Pool(2)",
            baseline=summary(doc_b, 2),
            ratio=doc_ratio,
            target="ratio ≥ 0.9",
            met=doc_ratio["median"] is not None and doc_ratio["median"] >= 0.9,
            notes=f"submitted via {submitter.via}, index=false (conversion and chunking, as "
            f"the baseline; embedding and indexing: row s7); documents: {kinds}.{task_note} "
            f"CPU ms per document by process (median): {cpu_note['docs']}.",
            details={
                "submitted_via": submitter.via,
                "rates": rates,
                "cpu_ms_per_file": cpu_note,
            },
        ),
        Row(
            key="5b",
            figure=f"PDF pages/s, {cfg['pdf_count']} PDFs × {cfg['pdf_pages']} pages, "
            "2 worker processes",
            unit="pages/s",
            value=summary(page_m, 1),
            baseline_name="process_document in Pool(2)",
            baseline=summary(page_b, 1),
            ratio=page_ratio,
            target="reported (issue 3)",
            met=None,
            notes=f"submitted via {submitter.via}, index=false; CPU ms per PDF by process "
            f"(median): {cpu_note['pages']}.",
        ),
    ]
