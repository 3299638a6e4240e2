"""The ``search`` group (issue 14): the index at 100,000 chunks, and embedding + indexing
through jobs against the raw model.

The index is a fresh embedded PostgreSQL + pgvector (``Bench.start_index``: the server
``morag up`` runs) with the store's default schema (HNSW m=16, ef_construction=64, the
GIN full-text index) and the default ``MORAG_INDEX_EF_SEARCH``.

- **Chunks**: consecutive 12-word passages (no overlap) of the reStructuredText sources of
  the Python 3.11 documentation (Debian's ``python3.11-doc``): real English text, 116,000
  distinct passages. **Vectors**: those passages embedded by the packaged model, written
  through ``IndexStore.replace_document`` (documents of 100 chunks), the workers' write
  path. Short passages keep embedding 100,000 of them to minutes here (long chunks would
  take hours on two cores); the vectors are cached under ``bench/results/tmp`` by model and
  text, so later runs skip it.
- **Queries**: the phrases of the committed retrieval evaluation set
  (``bench/data/python-docs-eval.json``, the Python docs' own general index), embedded by
  the model (vector side), as text (keyword side), both (hybrid). Through the API the
  query text is embedded by the real model in the API process.
- **Baseline** (same run, interleaved): the same query answered exactly: numpy over the
  100,000 float32 vectors in memory (a matrix product and a partial sort), the keyword
  query by PostgreSQL without its GIN index (a sequential scan ranking every chunk), the
  hybrid query by both fused the same way; through the API, that plus embedding the
  query in-process.
- **Recall@10**: the HNSW answer's ids against numpy's exact top 10, per query, averaged.
  Below 0.95 the row says so and ``hnsw.ef_search`` is raised until it holds. Seeded random
  unit queries are measured too (the worst case: no query lies near the data).
- **Size**: ``pg_total_relation_size`` of the chunks and documents tables (heap, TOAST,
  HNSW, GIN, keys) per 1,000 chunks.
- **Jobs vs model**: one worker with one pool process, onnxruntime's threads on both
  cores (``MORAG_EMBEDDING_THREADS=0``) as the baseline's, real documents (Python docs
  pages as ``.txt``) uploaded through ``POST /api/v1/ingest/file`` one after another
  into the 100,000-chunk index.
  A job's embedding + indexing time runs from its first ``embedding`` event to its
  ``finished_at`` (embedding, the index write, the final record write); the rate is all
  chunks over the sum of those times. The baseline embeds the same chunk texts (read back
  from the index) with ``load_embedder`` in this process, per document, in batches of
  ``MORAG_EMBEDDING_BATCH_SIZE``. End-to-end chunks/s (first upload to last
  ``finished_at``, processing included) is in the notes.
- **Worker RSS**: ``VmRSS`` (and ``VmHWM``) of that worker's main and pool process after
  its jobs, model loaded (preloaded at start).
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.infra import ROOT, Bench
from bench.report import Row, paired_ratios, skipped
from bench.stats import percentile, summary

CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
OWNER = "anonymous"  # the API's owner without keys: its searches see these chunks
EVAL_SET = ROOT / "bench" / "data" / "python-docs-eval.json"
VECTOR_CACHE = ROOT / "bench" / "results" / "tmp"
WINDOW = 12  # words per passage, consecutive and not overlapping
CHUNKS_PER_DOCUMENT = 100
K = 10


def corpus_words() -> list[str]:
    words: list[str] = []
    for path in sorted(CORPUS.rglob("*.txt")):
        words.extend(path.read_text(errors="replace").split())
    return words


def make_chunks(words: list[str], count: int) -> list[str]:
    chunks = [" ".join(words[start : start + WINDOW]) for start in range(0, len(words), WINDOW)]
    if len(chunks) < count:
        raise RuntimeError(f"the corpus gives {len(chunks)} chunks, fewer than {count}")
    return chunks[:count]


def random_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def eval_phrases(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` phrases of the committed evaluation set, picked at random (seeded)."""
    queries = [q["query"] for q in json.loads(EVAL_SET.read_text())["queries"]]
    return [queries[i] for i in rng.choice(len(queries), size=min(n, len(queries)), replace=False)]


def embed_passages(embedder: Any, chunks: list[str]) -> np.ndarray:
    """The model's vectors of ``chunks``, cached on disk by model and texts (embedding
    100,000 passages takes minutes; the cache is not committed)."""
    digest = hashlib.sha256(embedder.name.encode())
    for text in chunks:
        digest.update(text.encode() + b"\0")
    cache = VECTOR_CACHE / f"search-vectors-{digest.hexdigest()[:16]}.npy"
    if cache.is_file():
        print(f"bench: search: vectors from {cache.name}", flush=True)
        return np.load(cache)
    started = time.perf_counter()
    parts = []
    for first in range(0, len(chunks), 4096):
        parts.append(embedder.embed_documents(chunks[first : first + 4096]))
        done = first + len(parts[-1])
        rate = done / (time.perf_counter() - started)
        print(f"bench: search: {done} passages embedded ({rate:.0f}/s)", flush=True)
    vectors = np.concatenate(parts).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


class ExactSearch:
    """The baseline: every vector compared (numpy), every chunk ranked (no GIN index)."""

    def __init__(self, vectors: np.ndarray, store: Any, index_url: str) -> None:
        from morag.services.search.store import IndexStore

        self.vectors = vectors
        self.keyword_store = IndexStore(index_url, dim=store.dim)
        conn = self.keyword_store._conn()
        conn.run("SET enable_bitmapscan = off")
        conn.run("SET enable_indexscan = off")

    def vector(self, query: np.ndarray, k: int) -> np.ndarray:
        scores = self.vectors @ query
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]

    def keyword(self, text: str, k: int) -> list[Any]:
        from morag.services.search.store import SearchFilters

        return self.keyword_store.keyword_search(OWNER, text, k, SearchFilters())

    def hybrid(self, query: np.ndarray, text: str, k: int) -> list[tuple[int, float]]:
        from morag.services.search import HYBRID_CANDIDATES as HYBRID_DEPTH
        from morag.services.search.store import KEYWORD_WEIGHT, fuse

        vector_ids = [int(i) for i in self.vector(query, HYBRID_DEPTH)]
        keyword_ids = [-h.chunk_id for h in self.keyword(text, HYBRID_DEPTH)]
        scores = fuse([vector_ids, keyword_ids], weights=(1.0, KEYWORD_WEIGHT))
        return sorted(scores.items(), key=lambda item: -item[1])[:k]


def _global_index(hit: Any, doc_index: dict[str, int]) -> int:
    return doc_index[hit.document_id] * CHUNKS_PER_DOCUMENT + hit.chunk_index


def _timed(calls: list[Any]) -> list[float]:
    """Milliseconds of each call."""
    out = []
    for call in calls:
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def _fill(store: Any, chunks: list[str], vectors: np.ndarray) -> tuple[float, dict[str, int]]:
    from morag.services.search.store import ChunkRow, DocumentRecord

    doc_index: dict[str, int] = {}
    started = time.perf_counter()
    for d, first in enumerate(range(0, len(chunks), CHUNKS_PER_DOCUMENT)):
        doc_id = f"doc_bench{d:06d}"
        doc_index[doc_id] = d
        part = chunks[first : first + CHUNKS_PER_DOCUMENT]
        store.replace_document(
            DocumentRecord(
                owner=OWNER,
                document_id=doc_id,
                source=f"python-docs-{d}.txt",
                kind="document",
                content_key=f"sha256:bench{d}",
            ),
            [ChunkRow(i, text, {}) for i, text in enumerate(part)],
            vectors[first : first + len(part)],
        )
        if d % 100 == 99:
            print(f"bench: search: {first + len(part)} chunks indexed", flush=True)
    return time.perf_counter() - started, doc_index


def _sizes(store: Any) -> dict[str, int]:
    names = {
        "chunks (heap, TOAST, all indexes)": "pg_total_relation_size('morag_chunks')",
        "documents": "pg_total_relation_size('morag_documents')",
        "HNSW index": "pg_relation_size('morag_chunks_embedding')",
        "GIN index": "pg_relation_size('morag_chunks_tsv')",
        "chunks heap + TOAST": "pg_table_size('morag_chunks')",
    }
    conn = store._conn()
    return {name: int(conn.run(f"SELECT {expr}")[0][0]) for name, expr in names.items()}


def _recall(
    store: Any, exact: ExactSearch, queries: np.ndarray, doc_index: dict[str, int]
) -> float:
    from morag.services.search.store import SearchFilters

    found = []
    for q in queries:
        hits = store.vector_search(OWNER, q, K, SearchFilters())
        got = {_global_index(h, doc_index) for h in hits}
        found.append(len(got & {int(i) for i in exact.vector(q, K)}) / K)
    return float(np.mean(found))


def run_search(bench: Bench, cfg: dict[str, Any]) -> list[Row]:
    if not CORPUS.is_dir():
        return [skipped("s", "search", f"{CORPUS} missing (apt-get install python3.11-doc)")]
    from morag.processors.embedding import load_embedder
    from morag.services.search import HYBRID_CANDIDATES as HYBRID_DEPTH
    from morag.services.search.store import IndexStore, SearchFilters, hybrid

    n_chunks, n_queries, reps = cfg["search_chunks"], cfg["search_queries"], cfg["reps"]
    ef_search = cfg.get("search_ef_search", 100)
    index_url = bench.start_index()
    embedder = load_embedder(None, 32, 0)
    dim = embedder.dim
    rng = np.random.default_rng(14)
    words = corpus_words()
    chunks = make_chunks(words, n_chunks)
    vectors = embed_passages(embedder, chunks)
    store = IndexStore(index_url, dim=dim, ef_search=ef_search)
    fill_seconds, doc_index = _fill(store, chunks, vectors)
    print(f"bench: search: filled in {fill_seconds:.0f} s", flush=True)
    store._conn().run("VACUUM ANALYZE morag_chunks")
    store._conn().run("VACUUM ANALYZE morag_documents")
    sizes = _sizes(store)
    exact = ExactSearch(vectors, store, index_url)

    texts = eval_phrases(rng, n_queries)
    query_vectors = np.stack([embedder.embed_query(text) for text in texts])
    none = SearchFilters()

    def store_hybrid(q: np.ndarray, text: str) -> list[Any]:
        return hybrid(
            store.vector_search(OWNER, q, HYBRID_DEPTH, none),
            store.keyword_search(OWNER, text, HYBRID_DEPTH, none),
            K,
        )

    # Recall first (also warms the HNSW pages into the cache): at the configured
    # ef_search, then higher until 0.95 holds.
    recall_by_ef: dict[int, float] = {}
    for ef in (ef_search, 200, 400, 800, 1000):
        if ef < ef_search or ef in recall_by_ef:
            continue
        store._conn().run(f"SET hnsw.ef_search = {ef}")
        recall_by_ef[ef] = round(_recall(store, exact, query_vectors, doc_index), 4)
        if recall_by_ef[ef] >= 0.95:
            break
    store._conn().run(f"SET hnsw.ef_search = {ef_search}")
    # The worst case: queries far from every passage (random directions).
    recall_random = round(_recall(store, exact, random_unit(rng, n_queries, dim), doc_index), 4)

    print(f"bench: search: recall {recall_by_ef}, random queries {recall_random}", flush=True)
    # The API (no keys: owner anonymous), its query model warmed up.
    import httpx

    api, base = bench.start_api()
    client = httpx.Client(base_url=base, timeout=60)

    def api_hybrid(text: str) -> None:
        answer = client.post("/api/v1/search", json={"query": text, "k": K, "mode": "hybrid"})
        if answer.status_code != 200 or len(answer.json()["hits"]) != K:
            raise RuntimeError(f"search answered {answer.status_code}: {answer.text[:300]}")

    for text in texts[:5]:
        api_hybrid(text)

    tuned = next((ef for ef, r in recall_by_ef.items() if r >= 0.95), None)
    tuned_store = None
    if tuned is not None and tuned != ef_search:
        tuned_store = IndexStore(index_url, dim=dim, ef_search=tuned)
    sides = {
        "vector": (
            lambda i: store.vector_search(OWNER, query_vectors[i], K, none),
            lambda i: exact.vector(query_vectors[i], K),
        ),
        "keyword": (
            lambda i: store.keyword_search(OWNER, texts[i], K, none),
            lambda i: exact.keyword(texts[i], K),
        ),
        "hybrid": (
            lambda i: store_hybrid(query_vectors[i], texts[i]),
            lambda i: exact.hybrid(query_vectors[i], texts[i], K),
        ),
        "api hybrid": (
            lambda i: api_hybrid(texts[i]),
            lambda i: exact.hybrid(embedder.embed_query(texts[i]), texts[i], K),
        ),
    }
    if tuned_store is not None:
        sides["vector tuned"] = (
            lambda i: tuned_store.vector_search(OWNER, query_vectors[i], K, none),
            lambda i: exact.vector(query_vectors[i], K),
        )
    lat: dict[str, dict[str, dict[str, list[float]]]] = {
        name: {side: {"p50": [], "p99": []} for side in ("morag", "base")} for name in sides
    }
    try:
        for rep in range(reps):
            for name, (ours, theirs) in sides.items():
                order = [("morag", ours), ("base", theirs)]
                if rep % 2:
                    order.reverse()
                for side, fn in order:
                    samples = _timed([lambda i=i, fn=fn: fn(i) for i in range(n_queries)])
                    lat[name][side]["p50"].append(percentile(samples, 50))
                    lat[name][side]["p99"].append(percentile(samples, 99))
    finally:
        client.close()
        bench.stop(api)

    rows: list[Row] = []
    baseline_names = {
        "vector": "numpy exact scan",
        "keyword": "same query, no GIN index (seq scan)",
        "hybrid": "numpy exact + keyword seq scan, fused",
        "api hybrid": "in-process: embed query + exact hybrid",
        "vector tuned": "numpy exact scan",
    }
    labels = {
        "vector": "vector search (store, HNSW)",
        "keyword": "keyword search (store, GIN + ts_rank_cd)",
        "hybrid": "hybrid search (store: vector + keyword, RRF)",
        "api hybrid": "hybrid search through POST /api/v1/search (query embedded by the model)",
        "vector tuned": f"vector search (store, HNSW) at ef_search={tuned}, where recall ≥ 0.95",
    }
    keys = {
        "vector": ("s1a", "s1b"),
        "keyword": ("s2a", "s2b"),
        "hybrid": ("s3a", "s3b"),
        "api hybrid": ("s4a", "s4b"),
        "vector tuned": ("s1c", "s1d"),
    }
    for name in sides:
        for stat in ("p50", "p99"):
            ours, base = lat[name]["morag"][stat], lat[name]["base"][stat]
            rows.append(
                Row(
                    key=keys[name][0 if stat == "p50" else 1],
                    figure=f"{labels[name]}, {stat}, {n_chunks:,} chunks, k={K}",
                    unit="ms",
                    value=summary(ours, 2),
                    baseline_name=baseline_names[name],
                    baseline=summary(base, 2),
                    ratio=paired_ratios(ours, base),
                    target="reported",
                    met=None,
                    notes=(
                        f"{n_queries} queries per repetition; ratio < 1 is faster than the exact "
                        "answer."
                        if stat == "p50"
                        else ""
                    ),
                )
            )
    recall = recall_by_ef[ef_search]
    rows.append(
        Row(
            key="s5",
            figure=f"recall@{K} of the HNSW index vs the exact top {K} "
            f"(hnsw.ef_search={ef_search}, the evaluation set's phrases as queries)",
            unit="",
            value=summary([recall], 4),
            target="≥ 0.95",
            met=recall >= 0.95,
            notes=f"recall by ef_search: {recall_by_ef}"
            + (
                ""
                if recall >= 0.95
                else f"; 0.95 first reached at ef_search={tuned}"
                if tuned
                else "; 0.95 not reached at any ef_search up to 1000 (pgvector's maximum)"
            )
            + f". Random unit queries (far from every passage, the worst case): recall "
            f"{recall_random} at ef_search={ef_search}.",
            details={"recall_by_ef_search": recall_by_ef, "recall_random_queries": recall_random},
        )
    )
    per_thousand = (sizes["chunks (heap, TOAST, all indexes)"] + sizes["documents"]) / (
        n_chunks / 1000
    )
    rows.append(
        Row(
            key="s6",
            figure=f"index size per 1,000 chunks ({dim}-d vectors, {WINDOW}-word chunks)",
            unit="MB",
            value=summary([per_thousand / 1e6], 3),
            target="reported",
            notes="; ".join(f"{k}: {v / 1e6:.1f} MB" for k, v in sizes.items())
            + f" for {n_chunks:,} chunks. Filled through IndexStore.replace_document in "
            f"{fill_seconds:.0f} s ({n_chunks / fill_seconds:.0f} chunks/s, HNSW and GIN "
            "maintained on every insert, one writer).",
            details={"bytes": sizes, "fill_seconds": round(fill_seconds, 1)},
        )
    )
    rows += _jobs_vs_model(bench, cfg, store, embedder)
    store.close()
    exact.keyword_store.close()
    return rows


# -- embedding + indexing through jobs vs the raw model --------------------------------------


def _documents(bench: Bench, count: int) -> list[Path]:
    """``count`` Python docs pages of 6-16 KB, as ``.txt`` uploads."""
    folder = bench.files_dir / "search-docs"
    folder.mkdir(exist_ok=True)
    picked = [p for p in sorted(CORPUS.rglob("*.txt")) if 6_000 <= p.stat().st_size <= 16_000][
        :count
    ]
    out = []
    for n, path in enumerate(picked):
        target = folder / f"{n:02d}-{path.name.replace('.rst.txt', '')}.txt"
        target.write_text(path.read_text(errors="replace"))
        out.append(target)
    return out


def _ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _through_jobs(bench: Bench, client: Any, paths: list[Path], rep: int) -> dict[str, Any]:
    """Uploads one after another (each waits for the last): per job, the seconds from its
    first ``embedding`` event to ``finished_at``, and its document id."""
    from bench.document_rows import wait_jobs

    redis = bench.client()
    started = time.time()
    stage_seconds, doc_ids, last = [], [], 0.0
    for path in paths:
        # A new line per repetition: new content, so a job of its own (no dedupe).
        body = path.read_bytes() + f"\n\nrepetition {rep}\n".encode()
        reply = client.post("/api/v1/ingest/file", files={"file": (path.name, body)})
        if reply.status_code != 202:
            raise RuntimeError(f"upload refused: {reply.status_code} {reply.text}")
        task_id = reply.json()["task_id"]
        last, counts = wait_jobs(bench, [task_id], timeout=600)
        if counts.get(b"success") != 1:
            raise RuntimeError(f"job {task_id} did not succeed: {counts}")
        events = redis.lrange(f"{bench.morag_ns}:job:{task_id}:history", 0, -1)
        begin = min(_ts(e["ts"]) for e in map(json.loads, events) if e.get("stage") == "embedding")
        stage_seconds.append(last - begin)
        status = client.get(f"/api/v1/status/{task_id}").json()
        doc_ids.append(status["result"]["document_id"])
    return {
        "stage_seconds": sum(stage_seconds),
        "wall_seconds": last - started,
        "document_ids": doc_ids,
    }


def _chunk_texts(store: Any, doc_ids: list[str]) -> list[list[str]]:
    conn = store._conn()
    return [
        [
            r[0]
            for r in conn.run(
                "SELECT text FROM morag_chunks WHERE owner = :o AND document_id = :d "
                "ORDER BY chunk_index",
                o=OWNER,
                d=doc_id,
            )
        ]
        for doc_id in doc_ids
    ]


def _raw_model(embedder: Any, documents: list[list[str]], batch: int) -> float:
    started = time.perf_counter()
    for texts in documents:
        for first in range(0, len(texts), batch):
            embedder.embed_documents(texts[first : first + batch])
    return time.perf_counter() - started


def _jobs_vs_model(bench: Bench, cfg: dict[str, Any], store: Any, embedder: Any) -> list[Row]:
    import httpx

    from bench.resource_rows import peak_rss_mb, rss_mb

    paths = _documents(bench, cfg["search_documents"])
    # onnxruntime on both cores, like the baseline's model (load_embedder(None, 32, 0))
    worker = bench.start_morag_worker(1, queues="document_processing", embedding_threads="0")
    api, base = bench.start_api()
    client = httpx.Client(base_url=base, timeout=60)
    jobs_rate: list[float] = []
    model_rate: list[float] = []
    wall_rate: list[float] = []
    chunk_total = 0
    try:
        _through_jobs(bench, client, paths[:2], rep=-1)  # warm-up: the child's first job
        texts: list[list[str]] = []  # the chunks of the latest jobs (rep 0 runs them first)
        for rep in range(cfg["reps"]):
            order = ["jobs", "model"] if rep % 2 == 0 else ["model", "jobs"]
            for side in order:
                if side == "jobs":
                    done = _through_jobs(bench, client, paths, rep)
                    texts = _chunk_texts(store, done["document_ids"])
                    chunk_total = sum(len(t) for t in texts)
                    jobs_rate.append(chunk_total / done["stage_seconds"])
                    wall_rate.append(chunk_total / done["wall_seconds"])
                else:
                    seconds = _raw_model(embedder, texts, 32)
                    model_rate.append(sum(len(t) for t in texts) / seconds)
        (child,) = worker.children()
        main_rss, child_rss = rss_mb(worker.pid), rss_mb(child)
        main_hwm, child_hwm = peak_rss_mb(worker.pid), peak_rss_mb(child)
    finally:
        client.close()
        bench.stop(api)
        bench.stop(worker)
    ratio = paired_ratios(jobs_rate, model_rate)
    return [
        Row(
            key="s7",
            figure=f"chunks embedded and indexed per second through jobs ({len(paths)} Python "
            f"docs pages, {chunk_total} chunks, 1 worker process, into the {cfg['search_chunks']:,}"
            "-chunk index)",
            unit="chunks/s",
            value=summary(jobs_rate, 2),
            baseline_name="the model in-process on the same chunks",
            baseline=summary(model_rate, 2),
            ratio=ratio,
            target="ratio ≥ 0.9",
            met=ratio["median"] is not None and ratio["median"] >= 0.9,
            notes="jobs: Σ chunks / Σ (finished_at − first 'embedding' event) over the jobs, "
            "uploaded one at a time through the API; end to end, processing included: "
            f"{summary(wall_rate, 2)['median']} chunks/s (first upload to last end).",
            details={"jobs": jobs_rate, "model": model_rate, "end_to_end": wall_rate},
        ),
        Row(
            key="s8",
            figure="worker RSS with the embedding model loaded (main + one pool process)",
            unit="MB",
            value=summary([main_rss + child_rss], 0),
            target="reported",
            notes=f"after the jobs above: main {main_rss:.0f} MB, pool process {child_rss:.0f} "
            f"MB (peaks {main_hwm:.0f} and {child_hwm:.0f} MB); the model loads in each pool "
            "process (preload at start).",
            details={"main_mb": round(main_rss), "pool_mb": round(child_rss)},
        ),
    ]
