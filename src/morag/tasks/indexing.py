"""The end of a job's pipeline: embed its chunks (stage ``embedding``) and write them to
the index (stage ``indexing``), so the job is a success only once they are searchable.

The embedding model is loaded once per worker process (on its first job, or at start-up
with ``preload_models``) and the store is opened once per process (services/search).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from morag.core.config import settings
from morag.processors.base import ProcessingResult
from morag.services.search.documents import document_id, file_content_key, url_content_key
from morag.services.search.store import ChunkRow, DocumentRecord, IndexStore, wait_for_index

logger = structlog.get_logger(__name__)

#: The share of a job's progress its embedding and indexing take when it indexes.
INDEX_SHARE = 0.15
_EMBED_END = 0.97  # embedding ends here; the write to the index takes the rest

_lock = threading.Lock()
_embedder: Any = None
_stores: dict[tuple[str, int], IndexStore] = {}


def wants_index(options: dict[str, Any] | None) -> bool:
    """Whether a job with these options indexes its chunks (``options.index``)."""
    value = (options or {}).get("index")
    return settings.index_by_default if value is None else bool(value)


def get_embedder() -> Any:
    """The process's embedding model (loaded on first use)."""
    global _embedder
    if _embedder is None:
        with _lock:
            if _embedder is None:
                from morag.processors.embedding import load_embedder

                # the same arguments as the worker's preload (lifecycle.py): one model
                _embedder = load_embedder(
                    settings.embedding_model_path or None,
                    settings.embedding_batch_size,
                    settings.embedding_threads,
                )
    return _embedder


def get_store(dim: int) -> IndexStore:
    key = (settings.index_url, dim)
    store = _stores.get(key)
    if store is None:
        with _lock:
            store = _stores.setdefault(
                key, IndexStore(settings.index_url, dim=dim, ef_search=settings.index_ef_search)
            )
    return store


def describe_input(kind: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    """(content key, source name) of a job's input: a file by its bytes and the name the
    client gave it, a URL by its normalised form and as submitted."""
    metadata = kwargs.get("metadata") or {}
    url = kwargs.get("url") or ""
    if url:
        return url_content_key(url), url
    path = Path(kwargs["file_path"])
    return file_content_key(path), str(metadata.get("filename") or path.name)


def index_result(
    task: Any, result: ProcessingResult, kwargs: dict[str, Any], owner: str, job_id: str
) -> str:
    """Embed ``result``'s chunks and replace its document's chunks in the index; returns
    the document id (also set on ``result``)."""
    content_key, source = describe_input(result.kind, kwargs)
    doc_id = document_id(owner, content_key)
    chunks = result.chunks
    start = 1.0 - INDEX_SHARE
    task.update_progress(start, f"embedding {len(chunks)} chunks", stage="embedding")
    embedder = get_embedder()
    batch = settings.embedding_batch_size
    vectors = np.zeros((0, embedder.dim), dtype=np.float32)
    parts = []
    for first in range(0, len(chunks), batch):
        texts = [c.text for c in chunks[first : first + batch]]
        parts.append(np.asarray(embedder.embed_documents(texts), dtype=np.float32))
        done = min(first + batch, len(chunks))
        task.update_progress(
            start + (_EMBED_END - start) * done / len(chunks),
            f"embedded {done} of {len(chunks)} chunks",
            stage="embedding",
        )
    if parts:
        vectors = np.concatenate(parts)
    task.update_progress(_EMBED_END, f"writing {len(chunks)} chunks", stage="indexing")
    store = get_store(embedder.dim)
    metadata = dict(kwargs.get("metadata") or {})
    metadata.pop("filename", None)  # it is the source
    record = DocumentRecord(
        owner=owner,
        document_id=doc_id,
        source=source,
        kind=result.kind,
        title=result.metadata.get("title"),
        metadata=metadata,
        content_key=content_key,
        job_id=job_id,
    )
    rows = [ChunkRow(c.index, c.text, c.metadata) for c in chunks]
    wait_for_index(
        store,
        settings.index_patience_seconds,
        lambda: store.replace_document(record, rows, vectors),
    )
    task.update_progress(1.0, f"{len(chunks)} chunks searchable", stage="indexing")
    result.document_id = doc_id
    logger.info("document indexed", document_id=doc_id, chunks=len(chunks), job_id=job_id)
    return doc_id
