"""The raw embedding model in-process: chunks/s for 512-token chunks, and the RSS it costs.

``raw_embed_rate`` is the baseline of issue 14's "chunks embedded and indexed per second
through jobs vs the raw model embedding the same chunks in-process": give it the same chunk
texts the jobs embedded. Run alone it prints the figures for chunks made here:

    python -m bench.embedding_rows                 # packaged model, 64 chunks, 3 repetitions
    python -m bench.embedding_rows --chunks 128 --threads 1 --processes 2
    python -m bench.embedding_rows --model-path /models/bge-small-onnx

Chunks: the Python documentation's library pages (Debian's python3.11-doc, when installed)
or else this repository's Markdown, cut by morag's own chunker into 512-token chunks
(64 tokens overlap), the shape the jobs embed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from html import unescape
from pathlib import Path
from typing import Any

from bench.infra import ROOT
from bench.stats import summary

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/library")


def _source_texts() -> list[str]:
    if PYTHON_DOCS.is_dir():
        pages = sorted(PYTHON_DOCS.glob("*.html"))[:80]
        texts = []
        for page in pages:
            body = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", page.read_text(errors="replace"))
            texts.append(unescape(re.sub(r"<[^>]+>", " ", body)))
        return texts
    return [p.read_text() for p in sorted(ROOT.glob("**/*.md")) if ".venv" not in p.parts]


def make_chunks(count: int = 64, chunk_tokens: int = 512) -> list[str]:
    """``count`` chunk texts of up to ``chunk_tokens`` tokens, from real prose."""
    from morag.processors.base import ChunkingOptions, TextSegment
    from morag.processors.chunking import chunk_segments

    options = ChunkingOptions(chunk_tokens=chunk_tokens, overlap_tokens=64)
    chunks: list[str] = []
    for text in _source_texts():
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        segments = [TextSegment(p) for p in paragraphs if p]
        # Full-size chunks only: the figure is for 512-token chunks.
        chunks += [
            c.text for c in chunk_segments(segments, options) if c.tokens > chunk_tokens * 0.8
        ]
        if len(chunks) >= count:
            return chunks[:count]
    if not chunks:
        raise RuntimeError("no source text for chunks")
    while len(chunks) < count:  # a small source: repeat it
        chunks += chunks[: count - len(chunks)]
    return chunks


def raw_embed_rate(
    texts: list[str],
    model_path: str | None = None,
    batch_size: int = 32,
    threads: int = 0,
    reps: int = 3,
) -> dict[str, Any]:
    """Chunks/s of the raw model embedding ``texts`` in this process (loaded and warmed
    first, not timed): the median of ``reps`` passes with min and max."""
    from morag.processors.embedding import load_embedder

    embedder = load_embedder(model_path or None, batch_size=batch_size, threads=threads)
    embedder.embed_documents(texts[: min(len(texts), batch_size)])  # warm-up
    rates, cpu_ms = [], []
    for _ in range(reps):
        start, cpu = time.perf_counter(), time.process_time()
        embedder.embed_documents(texts)
        rates.append(len(texts) / (time.perf_counter() - start))
        # CPU per chunk (all of onnxruntime's threads) barely moves with the machine's
        # other tenants, unlike the rate.
        cpu_ms.append((time.process_time() - cpu) * 1000 / len(texts))
    return {
        "model": embedder.name,
        "dim": embedder.dim,
        "chunks": len(texts),
        "batch_size": batch_size,
        "threads": threads,
        "chunks_per_s": summary(rates, 2),
        "cpu_ms_per_chunk": summary(cpu_ms, 1),
    }


def _child_rate(args: tuple[list[str], str | None, int, int]) -> float:
    texts, model_path, batch_size, threads = args
    return raw_embed_rate(texts, model_path, batch_size, threads, reps=1)["chunks_per_s"]["median"]


def parallel_embed_rate(
    texts: list[str],
    processes: int,
    model_path: str | None = None,
    batch_size: int = 32,
    threads: int = 1,
) -> float:
    """Chunks/s of ``processes`` processes each embedding its share (a prefork pool's shape);
    each loads and warms its own model before the timed pass."""
    shares = [texts[i::processes] for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        rates = pool.map(_child_rate, [(s, model_path, batch_size, threads) for s in shares])
    return sum(rates)


_RSS_PROBE = """
import json, sys, psutil
from morag.processors.embedding import load_embedder
import morag.processors.chunking, morag.processors.document  # what a worker child has loaded
proc = psutil.Process()
before = proc.memory_info().rss
embedder = load_embedder(sys.argv[1] or None)
loaded = proc.memory_info().rss
embedder.embed_documents(json.loads(sys.stdin.read()))
used = proc.memory_info().rss
print(json.dumps({"before_mb": before / 2**20, "loaded_mb": loaded / 2**20,
                  "after_batch_mb": used / 2**20}))
"""


def rss_delta(texts: list[str], model_path: str | None = None) -> dict[str, float]:
    """RSS of a fresh process before and after loading the model, and after one batch
    (onnxruntime's arena grows on the first run)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, model_path or ""],
        input=json.dumps(texts[:32]),
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    figures = json.loads(out.stdout)
    figures["model_delta_mb"] = figures["after_batch_mb"] - figures["before_mb"]
    return {k: round(v, 1) for k, v in figures.items()}


def worker_rss(concurrency: int = 2) -> dict[str, Any]:
    """RSS of a real ``morag worker``'s pool processes (document queue) with the models
    preloaded and without (``MORAG_PRELOAD_MODELS=false``): the model's cost per process."""
    import psutil

    from bench.infra import Bench, wait_for

    figures: dict[str, Any] = {}
    bench = Bench()
    try:
        bench.start_redis()
        for preload in ("true", "false"):
            worker = bench.start_morag_worker(
                concurrency, queues="document_processing", preload_models=preload
            )
            bench.wait_ready_line(worker)
            wait_for(lambda w=worker: len(w.children()) >= concurrency, 30, "the pool")
            rss = [psutil.Process(pid).memory_info().rss / 2**20 for pid in worker.children()]
            figures[f"preload_{preload}_mb"] = [round(r, 1) for r in rss]
            bench.stop(worker)
    finally:
        bench.close()
    on, off = figures["preload_true_mb"], figures["preload_false_mb"]
    figures["delta_per_process_mb"] = round(sum(on) / len(on) - sum(off) / len(off), 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: per core)")
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="also time N spawned processes with --threads each (a worker's pool)",
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--worker",
        action="store_true",
        help="also measure a real worker's pool processes with and without it",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    texts = make_chunks(args.chunks)
    result = raw_embed_rate(texts, args.model_path, args.batch_size, args.threads, args.reps)
    result["source"] = "python3.11-doc library pages" if PYTHON_DOCS.is_dir() else "repo Markdown"
    if args.processes:
        result["processes"] = args.processes
        result["parallel_chunks_per_s"] = round(
            parallel_embed_rate(
                texts, args.processes, args.model_path, args.batch_size, args.threads or 1
            ),
            2,
        )
    result["rss"] = rss_delta(texts, args.model_path)
    if args.worker:
        result["worker_rss"] = worker_rss()
    if args.json:
        print(json.dumps(result, indent=2))
        return
    rate = result["chunks_per_s"]
    print(
        f"model {result['model']} (dim {result['dim']}), {result['chunks']} chunks of 512 "
        f"tokens from {result['source']}, batch {args.batch_size}, threads {args.threads}"
    )
    print(
        f"in-process: {rate['median']} chunks/s (min {rate['min']}, max {rate['max']}, "
        f"{rate['n']} passes), {result['cpu_ms_per_chunk']['median']} CPU-ms a chunk"
    )
    if args.processes:
        print(
            f"{args.processes} processes x {args.threads or 1} thread: "
            f"{result['parallel_chunks_per_s']} chunks/s"
        )
    rss = result["rss"]
    print(
        f"RSS: {rss['before_mb']} MB before, {rss['loaded_mb']} MB loaded, "
        f"{rss['after_batch_mb']} MB after a batch of 32 (+{rss['model_delta_mb']} MB)"
    )


if __name__ == "__main__":
    main()
