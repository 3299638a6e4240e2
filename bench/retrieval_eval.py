"""Retrieval quality on the Python documentation, judged by its own general index.

The set (bench/data/python-docs-eval.json, made by bench/make_eval_set.py) lists library
pages of Debian's python3.11-doc and queries (index phrases), each with the places the
index points to: a page and the innermost section holding the anchor.

    python -m bench.retrieval_eval                     # starts its own `morag up` (temp data dir)
    python -m bench.retrieval_eval --url http://127.0.0.1:8000 [--api-key KEY]   # a running morag
    python -m bench.retrieval_eval --in-process        # vector only, no service: the raw model
    python -m bench.retrieval_eval --sweep             # the hybrid fusion's weight and depth

It ingests the set's pages through ``POST /api/v1/ingest/file`` (as ``json.html`` etc.),
waits for every job, then asks ``POST /api/v1/search`` ``{"query", "k": 10, "mode"}`` for
each query in ``keyword``, ``vector`` and ``hybrid`` mode, and prints recall@10 and MRR@10
(bench/results/retrieval.json keeps them with every query's rank).

**The match rule.** A hit is relevant to a query when, for one of the query's targets,

1. its document is the target's page: the file name of the hit's ``source`` equals the
   target's ``source`` (``json.html``), and
2. its section is the target's section: the innermost element of the hit's
   ``location.heading_path`` names the target's innermost section, either by an anchor
   (any ``(#anchor`` in it equal to the section's id, as heading paths held Sphinx's
   ``[¶](#basic-usage ...)`` links before they became plain text) or by its text
   (Markdown links reduced to their text, ``¶``, backticks, emphasis and escapes removed,
   whitespace collapsed, case-folded) equal to the section's title.

morag's chunker starts a new chunk at every heading change, so a chunk lies in one
section, and every chunk of the target section counts: the judgement is at the index's
granularity (a section), not a sentence. A deeper subsection is another section and does
not count. recall@10: the share of queries with a relevant hit among the first 10; MRR@10:
the mean of 1/rank of the first relevant hit (0 when none is in the first 10). Page-level
figures (rule 1 alone) are reported beside them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench.infra import ROOT

EVAL_SET = ROOT / "bench" / "data" / "python-docs-eval.json"
RESULTS = ROOT / "bench" / "results" / "retrieval.json"
MODES = ("keyword", "vector", "hybrid")
K = 10

_LINK = re.compile(r"\[([^\]]*)\]\((?:[^()\"]|\"[^\"]*\")*\)")
_ANCHOR = re.compile(r"\]\(#([^\s)\"]+)")
_ESCAPE = re.compile(r"\\(.)")


def normalise_heading(text: str) -> str:
    """A heading's words: Markdown links to their text, no ¶, markup or escapes, folded."""
    previous = None
    while previous != text:
        previous, text = text, _LINK.sub(r"\1", text)
    text = _ESCAPE.sub(r"\1", text).replace("¶", "").replace("`", "").replace("*", "")
    return " ".join(text.split()).casefold()


def heading_anchors(text: str) -> set[str]:
    return set(_ANCHOR.findall(text))


def hit_matches(hit: dict[str, Any], target: dict[str, Any], page_only: bool = False) -> bool:
    """The match rule of the module docstring."""
    if Path(str(hit.get("source") or "")).name != target["source"]:
        return False
    if page_only:
        return True
    path = (hit.get("location") or {}).get("heading_path") or []
    if not path:
        return False
    innermost = str(path[-1])
    return target["section_ids"][-1] in heading_anchors(innermost) or normalise_heading(
        innermost
    ) == normalise_heading(target["section_titles"][-1])


def first_relevant_rank(
    hits: list[dict[str, Any]], targets: list[dict[str, Any]], k: int = K, page_only: bool = False
) -> int | None:
    """1-based rank of the first relevant hit among the first ``k``, or None."""
    for rank, hit in enumerate(hits[:k], start=1):
        if any(hit_matches(hit, t, page_only) for t in targets):
            return rank
    return None


def metrics(ranks: Iterable[int | None]) -> dict[str, float]:
    """recall@k and MRR@k from each query's first relevant rank (None: not in the top k)."""
    ranks = list(ranks)
    if not ranks:
        return {"recall": 0.0, "mrr": 0.0, "queries": 0}
    return {
        "recall": round(sum(r is not None for r in ranks) / len(ranks), 4),
        "mrr": round(sum(1 / r for r in ranks if r) / len(ranks), 4),
        "queries": len(ranks),
    }


def evaluate(
    queries: list[dict[str, Any]], search: Callable[[str], list[dict[str, Any]]]
) -> dict[str, Any]:
    """Run every query through ``search`` and score it (section and page level)."""
    ranks, page_ranks, latencies = [], [], []
    for query in queries:
        start = time.perf_counter()
        hits = search(query["query"])
        latencies.append(time.perf_counter() - start)
        ranks.append(first_relevant_rank(hits, query["targets"]))
        page_ranks.append(first_relevant_rank(hits, query["targets"], page_only=True))
    return {
        **metrics(ranks),
        "page": metrics(page_ranks),
        "latency_ms_p50": round(statistics.median(latencies) * 1000, 1),
        "ranks": ranks,
    }


# -- through the API -------------------------------------------------------------------------
def ingest(client: Any, files: list[Path], timeout: float) -> dict[str, Any]:
    """Upload every file, wait for every job; returns counts and the wall time."""
    start = time.perf_counter()
    ids = [client.ingest_file(path)["task_id"] for path in files]
    finals = [client.wait(task_id, timeout=timeout) for task_id in ids]
    elapsed = time.perf_counter() - start
    failed = [f for f in finals if f.get("status") != "success"]
    if failed:
        raise RuntimeError(f"{len(failed)} ingestion jobs did not succeed: {failed[:3]}")
    return {"documents": len(ids), "seconds": round(elapsed, 1)}


def api_search(
    base_url: str, api_key: str | None, mode: str, k: int = K
) -> Callable[[str], list[dict]]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    http = httpx.Client(base_url=base_url, headers=headers, timeout=60)

    def search(query: str) -> list[dict[str, Any]]:
        response = http.post("/api/v1/search", json={"query": query, "k": k, "mode": mode})
        response.raise_for_status()
        body = response.json()
        return body["hits"] if isinstance(body, dict) else body

    return search


def start_morag(tmp: Path, concurrency: int) -> tuple[Any, str]:
    """``morag up`` (embedded Redis and index, a worker, the API) on a free loopback port,
    its data in ``tmp``; returns the process and the API's base URL once it is ready."""

    from bench.infra import Service, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    argv = [
        sys.executable,
        "-m",
        "morag.cli",
        "up",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(tmp / "data"),
        "--concurrency",
        str(concurrency),
    ]
    (tmp / "logs").mkdir(parents=True, exist_ok=True)
    service = Service("morag-up", argv, env, tmp / "logs")
    base = f"http://127.0.0.1:{port}"
    service.wait_answering(f"{base}/health/ready", 300, "morag up to be ready", 0.5, probe=2)
    return service, base


def run_api(
    data: dict[str, Any],
    docs: Path,
    url: str | None,
    api_key: str | None,
    modes: list[str],
    concurrency: int = 2,
    sweep: bool = False,
) -> dict[str, Any]:
    from morag.client import MoragClient

    service = None
    tmp = Path(tempfile.mkdtemp(prefix="morag-retrieval-"))
    try:
        if url is None:
            service, url = start_morag(tmp, concurrency)
        files = [docs / page["path"] for page in data["pages"]]
        with MoragClient(url, api_key=api_key, timeout=60) as client:
            ingestion = ingest(client, files, timeout=3600)
        print(f"ingested {ingestion['documents']} pages in {ingestion['seconds']} s", flush=True)
        results: dict[str, Any] = {"ingestion": ingestion, "modes": {}}
        for mode in modes:
            results["modes"][mode] = evaluate(data["queries"], api_search(url, api_key, mode))
            print(f"{mode}: {_line(results['modes'][mode])}", flush=True)
        if sweep:
            results["sweep"] = sweep_fusion(data["queries"], url, api_key)
        return results
    finally:
        if service is not None:
            service.stop(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


# -- the fusion's parameters ----------------------------------------------------------------
SWEEP_RRF_K = (5, 20, 60)
SWEEP_WEIGHTS = (0.0, 0.2, 0.3, 0.5, 1.0)
SWEEP_DEPTHS = (50, 100)


def sweep_fusion(queries: list[dict[str, Any]], url: str, api_key: str | None) -> list[dict]:
    """Hybrid recall@10 and MRR@10 for each RRF constant, keyword weight and candidate
    depth (weight 0 is the vector ranking alone): both rankings are fetched once through
    the API (``k`` 100) and fused here by the store's own ``fuse``, on all queries and on
    each half (even and odd ids), to show a choice is not fitted to one of them."""
    from morag.services.search.store import fuse

    vector, keyword = (
        api_search(url, api_key, "vector", k=100),
        api_search(url, api_key, "keyword", k=100),
    )
    fetched = [(q, vector(q["query"]), keyword(q["query"])) for q in queries]
    _keep_rankings(fetched)
    rows = []
    for rrf_k, depth, weight in itertools.product(SWEEP_RRF_K, SWEEP_DEPTHS, SWEEP_WEIGHTS):
        ranks: dict[str, list[int | None]] = {"all": [], "even": [], "odd": []}
        for query, v_hits, k_hits in fetched:
            by_key = {(h["document_id"], h["chunk_index"]): h for h in v_hits + k_hits}
            rankings = [
                [(h["document_id"], h["chunk_index"]) for h in hits[:depth]]
                for hits in (v_hits, k_hits)
            ]
            scores = fuse(rankings, weights=(1.0, weight), k=rrf_k)
            top = sorted(scores, key=lambda key: -scores[key])[:K]
            rank = first_relevant_rank([by_key[key] for key in top], query["targets"])
            ranks["all"].append(rank)
            ranks["even" if query["id"] % 2 == 0 else "odd"].append(rank)
        row: dict[str, Any] = {"rrf_k": rrf_k, "depth": depth, "keyword_weight": weight}
        row.update({part: metrics(r) for part, r in ranks.items()})
        rows.append(row)
        print(
            f"sweep rrf_k {rrf_k} depth {depth} weight {weight}: "
            + "  ".join(
                f"{part} {row[part]['recall']:.3f}/{row[part]['mrr']:.3f}"
                for part in ("all", "even", "odd")
            ),
            flush=True,
        )
    return rows


def _keep_rankings(fetched: list[tuple[dict[str, Any], list[dict], list[dict]]]) -> None:
    """Both rankings of every query, each hit as [document, chunk, score, relevant,
    page-relevant], in bench/results/tmp (not committed): other fusions can be tried on
    them without ingesting again."""
    out = []
    for query, *rankings in fetched:
        out.append(
            {
                "id": query["id"],
                "rankings": [
                    [
                        [
                            h["document_id"],
                            h["chunk_index"],
                            h["score"],
                            first_relevant_rank([h], query["targets"], k=1) is not None,
                            first_relevant_rank([h], query["targets"], 1, True) is not None,
                        ]
                        for h in hits
                    ]
                    for hits in rankings
                ],
            }
        )
    path = ROOT / "bench" / "results" / "tmp" / "retrieval-rankings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))


# -- in-process: the raw model, brute force ----------------------------------------------------
def run_in_process(data: dict[str, Any], docs: Path, model_path: str | None) -> dict[str, Any]:
    """Vector search without the service: morag's chunks of each page, the embedder, an
    exact cosine scan. A quick check of a model, not a substitute for the API run."""
    import numpy as np

    from morag.processors.document import process_document
    from morag.processors.embedding import load_embedder

    embedder = load_embedder(model_path or None)
    chunks: list[dict[str, Any]] = []
    for page in data["pages"]:
        for chunk in process_document(docs / page["path"]).chunks:
            chunks.append(
                {
                    "text": chunk.text,
                    "source": page["source"],
                    "location": {"heading_path": chunk.metadata.get("heading_path")},
                }
            )
    start = time.perf_counter()
    matrix = embedder.embed_documents([c["text"] for c in chunks])
    embed_seconds = time.perf_counter() - start

    def search(query: str) -> list[dict[str, Any]]:
        scores = matrix @ embedder.embed_query(query)
        return [chunks[i] for i in np.argsort(-scores)[:K]]

    result = evaluate(data["queries"], search)
    return {
        "model": embedder.name,
        "chunks": len(chunks),
        "chunks_per_s": round(len(chunks) / embed_seconds, 2),
        "modes": {"vector": result},
    }


def _line(m: dict[str, Any]) -> str:
    return (
        f"recall@10 {m['recall']:.3f}  MRR@10 {m['mrr']:.3f}  (page level: recall "
        f"{m['page']['recall']:.3f}, MRR {m['page']['mrr']:.3f}), p50 {m['latency_ms_p50']} ms"
    )


def table(results: dict[str, Any]) -> str:
    rows = [
        "| mode | recall@10 | MRR@10 | page recall@10 | page MRR@10 | p50 ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, m in results["modes"].items():
        rows.append(
            f"| {mode} | {m['recall']:.3f} | {m['mrr']:.3f} | {m['page']['recall']:.3f}"
            f" | {m['page']['mrr']:.3f} | {m['latency_ms_p50']} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running morag's base URL (default: start one)")
    parser.add_argument("--api-key")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="vector only, the raw model and an exact scan, no service",
    )
    parser.add_argument("--model-path", help="with --in-process: a model directory")
    parser.add_argument("--limit", type=int, default=0, help="only the first N queries")
    parser.add_argument(
        "--sweep", action="store_true", help="also fuse at several keyword weights and depths"
    )
    parser.add_argument("--set", type=Path, default=EVAL_SET)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    data = json.loads(args.set.read_text())
    if args.limit:
        data["queries"] = data["queries"][: args.limit]
    docs = Path(data["root"])
    missing = [p["path"] for p in data["pages"] if not (docs / p["path"]).is_file()]
    if missing:
        sys.exit(
            f"{len(missing)} pages missing under {docs}: apt-get install {data['package']}"
            f" (version {data['version']})"
        )
    if args.in_process:
        results = run_in_process(data, docs, args.model_path)
    else:
        results = run_api(
            data, docs, args.url, args.api_key, args.modes.split(","), sweep=args.sweep
        )
    results["set"] = {
        "file": str(args.set.relative_to(ROOT) if args.set.is_relative_to(ROOT) else args.set),
        "package": data["package"],
        "version": data["version"],
        "pages": len(data["pages"]),
        "queries": len(data["queries"]),
    }
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
