"""The index: documents and their chunks in PostgreSQL, with pgvector and full-text search.

Two tables (docs/search.md "The index"):

- ``morag_documents``: one row per (owner, document id): source, kind, title, the client's
  metadata, the job that wrote it, the chunk count, when it was first and last written;
- ``morag_chunks``: one row per chunk: its text, metadata (pages, heading path, times),
  embedding (``vector(dim)``, an HNSW index for cosine distance) and a stored ``tsvector``
  (a GIN index) for keyword ranking with ``ts_rank_cd``.

A document's chunks are replaced in one transaction keyed by (owner, document id): a
repeated job, a re-ingestion or two jobs of the same content racing leave one set of
chunks, never two or none. Every read takes an ``owner`` (``None``: every owner, for an
admin key). Connections are per thread and per process (a forked worker child opens its
own).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import pg8000.exceptions
import structlog

from morag.core.errors import ConfigurationError, TransientError
from morag.core.index_conn import connect, is_unavailable, parse_index_url

if TYPE_CHECKING:  # numpy loads only where vectors are (workers, searches): not at API start
    import numpy as np

logger = structlog.get_logger(__name__)

DOCUMENTS = "morag_documents"
CHUNKS = "morag_chunks"
META = "morag_index_meta"
#: Reciprocal rank fusion's constant: rank r scores weight / (RRF_K + r). Cormack et al.
#: (2009) used 60, which flattens the top of a ranking (rank 1 and 2 differ by 1/3,782);
#: 5 keeps the vector ranking's order among its first hits, where the relevant one
#: usually is (docs/search.md: on the Python docs set, MRR@10 0.787 against 0.746 at 60
#: and the vector ranking's 0.778; recall@10 0.956, better on both halves of the queries).
RRF_K = 5
#: The keyword ranking's weight in the fusion (the vector ranking's is 1). Any word of the
#: query matches, so keyword-only hits are many and noisy: at half weight, a keyword-only
#: first hit ranks with the vector ranking's seventh.
KEYWORD_WEIGHT = 0.5
#: The text search configuration of the stored tsvector and of queries.
TS_CONFIG = "english"
_UNDEFINED_TABLE = "42P01"
_T = TypeVar("_T")
_Id = TypeVar("_Id", bound=Hashable)


@dataclass
class DocumentRecord:
    owner: str
    document_id: str
    source: str
    kind: str
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    content_key: str = ""
    job_id: str | None = None
    chunk_count: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "document_id": self.document_id,
            "owner": self.owner,
            "source": self.source,
            "kind": self.kind,
            "title": self.title,
            "metadata": self.metadata,
            "job_id": self.job_id,
            "chunk_count": self.chunk_count,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


@dataclass
class ChunkRow:
    index: int
    text: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SearchFilters:
    kinds: tuple[str, ...] = ()
    document_ids: tuple[str, ...] = ()
    metadata: dict[str, Any] | None = None  # equality on the document's metadata (@>)
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass
class Hit:
    chunk_id: int
    owner: str
    document_id: str
    chunk_index: int
    text: str
    metadata: dict[str, Any]
    source: str
    kind: str
    score: float
    vector_rank: int | None = None
    keyword_rank: int | None = None

    def location(self) -> dict[str, Any]:
        """Where in its document the chunk is: pages, heading path, times (seconds)."""
        meta = self.metadata
        pages = meta.get("pages") or ([meta["page"]] if "page" in meta else None)
        return {
            "pages": pages,
            "heading_path": meta.get("heading_path"),
            "start_seconds": meta.get("start"),
            "end_seconds": meta.get("end"),
        }


def vector_literal(vector: Sequence[float] | np.ndarray) -> str:
    """pgvector's text form of one vector."""
    import numpy as np

    return "[" + ",".join(f"{x:.6g}" for x in np.asarray(vector, dtype=np.float32)) + "]"


def fuse(
    rankings: Sequence[Sequence[_Id]], weights: Sequence[float] = (), k: int = RRF_K
) -> dict[_Id, float]:
    """Weighted reciprocal rank fusion: each id's sum of weight / (k + rank) over the
    rankings (1-based; weights default to 1)."""
    scores: dict[_Id, float] = {}
    for index, ranking in enumerate(rankings):
        weight = weights[index] if index < len(weights) else 1.0
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + weight / (k + rank)
    return scores


class IndexStore:
    """The index at ``url``; ``dim`` is the embedding size (needed to create the schema,
    and checked against the one the index was created with)."""

    def __init__(self, url: str, dim: int | None = None, ef_search: int = 100) -> None:
        self.url = url
        self.address = parse_index_url(url)
        self.dim = dim
        self.ef_search = ef_search
        self._local = threading.local()
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------
    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = connect(self.address)
            conn.run(f"SET hnsw.ef_search = {int(self.ef_search)}")
            # Filters (owner, kind, ...) are applied while the HNSW scan goes on, so a
            # filtered query still finds k rows (pgvector >= 0.8).
            conn.run("SET hnsw.iterative_scan = relaxed_order")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to close
                conn.close()

    def close(self) -> None:
        self._drop_conn()

    def _run(self, work: Callable[[Any], _T]) -> _T:
        """``work(conn)``; a broken connection is dropped (the next call opens a new one)
        and an unreachable server raises ``TransientError``."""
        # A connection kept from before a server restart fails on first use: one more go
        # on a new connection (every ``work`` is a whole transaction, safe to repeat).
        reused = getattr(self._local, "conn", None) is not None
        try:
            return work(self._conn())
        except Exception as exc:
            if is_unavailable(exc):
                self._drop_conn()
                if reused:
                    return self._run(work)
                raise TransientError(
                    f"the index is unreachable ({self.address.describe()}): {exc}",
                    details={"index": self.address.describe()},
                ) from exc
            if isinstance(exc, pg8000.exceptions.DatabaseError):
                self._rollback()
            raise

    def _rollback(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.run("ROLLBACK")
            except Exception:
                self._drop_conn()

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[Any]:
        conn.run("BEGIN")
        try:
            yield conn
        except BaseException:
            try:
                conn.run("ROLLBACK")
            except Exception:
                self._drop_conn()
            raise
        conn.run("COMMIT")

    # -- schema --------------------------------------------------------------------------
    def ensure_schema(self) -> None:
        """Create the extension, tables and indexes once (any number of processes may race:
        an advisory lock makes one of them do it)."""
        if self._schema_ready:
            return
        if self.dim is None:
            raise ConfigurationError("the index needs the embedding size to create its tables")
        with self._schema_lock:
            if not self._schema_ready:
                self._run(self._create_schema)
                self._schema_ready = True

    def _create_schema(self, conn: Any) -> None:
        dim = int(self.dim or 0)
        with self._transaction(conn):
            conn.run("SELECT pg_advisory_xact_lock(hashtext('morag-index-schema'))")
            conn.run("CREATE EXTENSION IF NOT EXISTS vector")
            conn.run(f"CREATE TABLE IF NOT EXISTS {META} (key text PRIMARY KEY, value text)")
            conn.run(
                f"INSERT INTO {META} VALUES ('dim', :dim) ON CONFLICT (key) DO NOTHING",
                dim=str(dim),
            )
            stored = int(conn.run(f"SELECT value FROM {META} WHERE key = 'dim'")[0][0])
            if stored != dim:
                raise ConfigurationError(
                    f"the index holds {stored}-dimensional embeddings but the embedding model "
                    f"makes {dim}: use the model the index was built with, or a new index "
                    "(MORAG_INDEX_URL) and ingest again",
                    details={"index_dim": stored, "model_dim": dim},
                )
            conn.run(
                f"""CREATE TABLE IF NOT EXISTS {DOCUMENTS} (
                    owner text NOT NULL,
                    document_id text NOT NULL,
                    source text NOT NULL,
                    kind text NOT NULL,
                    title text,
                    metadata jsonb NOT NULL DEFAULT '{{}}',
                    content_key text NOT NULL,
                    job_id text,
                    chunk_count integer NOT NULL DEFAULT 0,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    updated_at timestamptz NOT NULL DEFAULT now(),
                    PRIMARY KEY (owner, document_id))"""
            )
            conn.run(
                f"CREATE INDEX IF NOT EXISTS {DOCUMENTS}_created ON {DOCUMENTS} "
                "(owner, created_at DESC)"
            )
            conn.run(
                f"""CREATE TABLE IF NOT EXISTS {CHUNKS} (
                    id bigserial PRIMARY KEY,
                    owner text NOT NULL,
                    document_id text NOT NULL,
                    chunk_index integer NOT NULL,
                    text text NOT NULL,
                    metadata jsonb NOT NULL DEFAULT '{{}}',
                    embedding vector({dim}) NOT NULL,
                    tsv tsvector GENERATED ALWAYS AS (to_tsvector('{TS_CONFIG}', text)) STORED,
                    UNIQUE (owner, document_id, chunk_index),
                    FOREIGN KEY (owner, document_id)
                        REFERENCES {DOCUMENTS} (owner, document_id) ON DELETE CASCADE)"""
            )
            conn.run(
                f"CREATE INDEX IF NOT EXISTS {CHUNKS}_embedding ON {CHUNKS} "
                "USING hnsw (embedding vector_cosine_ops)"
            )
            conn.run(f"CREATE INDEX IF NOT EXISTS {CHUNKS}_tsv ON {CHUNKS} USING gin (tsv)")

    # -- writes --------------------------------------------------------------------------
    def replace_document(
        self, document: DocumentRecord, chunks: Sequence[ChunkRow], vectors: np.ndarray
    ) -> None:
        """Write ``document`` with exactly these chunks, in one transaction: its earlier
        chunks (a re-ingestion, an earlier attempt) are gone when these appear."""
        if len(chunks) != len(vectors):
            raise ValueError("one vector per chunk")
        self.ensure_schema()

        def write(conn: Any) -> None:
            with self._transaction(conn):
                # The upsert locks the document's row first: two jobs writing the same
                # document take turns, and the later one's chunks are the ones left.
                conn.run(
                    f"""INSERT INTO {DOCUMENTS} (owner, document_id, source, kind, title,
                            metadata, content_key, job_id, chunk_count)
                        VALUES (:owner, :doc, :source, :kind, :title, CAST(:meta AS jsonb),
                            :content_key, :job, :count)
                        ON CONFLICT (owner, document_id) DO UPDATE SET
                            source = EXCLUDED.source, kind = EXCLUDED.kind,
                            title = EXCLUDED.title, metadata = EXCLUDED.metadata,
                            content_key = EXCLUDED.content_key, job_id = EXCLUDED.job_id,
                            chunk_count = EXCLUDED.chunk_count, updated_at = now()""",
                    owner=document.owner,
                    doc=document.document_id,
                    source=_clean(document.source),
                    kind=document.kind,
                    title=_clean(document.title) if document.title else None,
                    meta=_jsonb(document.metadata),
                    content_key=document.content_key,
                    job=document.job_id,
                    count=len(chunks),
                )
                conn.run(
                    f"DELETE FROM {CHUNKS} WHERE owner = :owner AND document_id = :doc",
                    owner=document.owner,
                    doc=document.document_id,
                )
                if chunks:
                    conn.run(
                        f"""INSERT INTO {CHUNKS}
                                (owner, document_id, chunk_index, text, metadata, embedding)
                            SELECT :owner, :doc, t.i, t.txt, CAST(t.meta AS jsonb),
                                CAST(t.emb AS vector)
                            FROM unnest(CAST(:idx AS integer[]), CAST(:texts AS text[]),
                                CAST(:metas AS text[]), CAST(:embs AS text[]))
                                AS t(i, txt, meta, emb)""",
                        owner=document.owner,
                        doc=document.document_id,
                        idx=[c.index for c in chunks],
                        texts=[_clean(c.text) for c in chunks],
                        metas=[_jsonb(c.metadata) for c in chunks],
                        embs=[vector_literal(v) for v in vectors],
                    )

        self._run(write)

    def delete_document(self, owner: str | None, document_id: str) -> bool:
        """Remove a document and its chunks; False when there is none the owner may see."""

        def delete(conn: Any) -> bool:
            rows = conn.run(
                f"DELETE FROM {DOCUMENTS} WHERE document_id = :doc"
                + (" AND owner = :owner" if owner is not None else "")
                + " RETURNING 1",
                doc=document_id,
                **({"owner": owner} if owner is not None else {}),
            )
            return bool(rows)

        return self._tolerate_missing(delete, False)

    # -- reads ---------------------------------------------------------------------------
    def get_document(self, owner: str | None, document_id: str) -> DocumentRecord | None:
        def read(conn: Any) -> DocumentRecord | None:
            rows = conn.run(
                f"SELECT {_DOC_COLUMNS} FROM {DOCUMENTS} WHERE document_id = :doc"
                + (" AND owner = :owner" if owner is not None else ""),
                doc=document_id,
                **({"owner": owner} if owner is not None else {}),
            )
            return _document(rows[0]) if rows else None

        return self._tolerate_missing(read, None)

    def list_documents(
        self, owner: str | None, offset: int = 0, limit: int = 50, kind: str | None = None
    ) -> tuple[list[DocumentRecord], int]:
        """A page of documents, newest first, and how many there are in all."""
        where, params = [], {}
        if owner is not None:
            where.append("owner = :owner")
            params["owner"] = owner
        if kind:
            where.append("kind = :kind")
            params["kind"] = kind
        clause = f" WHERE {' AND '.join(where)}" if where else ""

        def read(conn: Any) -> tuple[list[DocumentRecord], int]:
            total = conn.run(f"SELECT count(*) FROM {DOCUMENTS}{clause}", **params)[0][0]
            rows = conn.run(
                f"SELECT {_DOC_COLUMNS} FROM {DOCUMENTS}{clause} "
                "ORDER BY created_at DESC, document_id LIMIT :limit OFFSET :offset",
                limit=limit,
                offset=offset,
                **params,
            )
            return [_document(r) for r in rows], int(total)

        nothing: tuple[list[DocumentRecord], int] = ([], 0)
        return self._tolerate_missing(read, nothing)

    def chunk_count(self, owner: str | None = None) -> int:
        def read(conn: Any) -> int:
            if owner is None:
                return int(conn.run(f"SELECT count(*) FROM {CHUNKS}")[0][0])
            return int(conn.run(f"SELECT count(*) FROM {CHUNKS} WHERE owner = :o", o=owner)[0][0])

        return self._tolerate_missing(read, 0)

    def vector_search(
        self, owner: str | None, vector: np.ndarray, limit: int, filters: SearchFilters
    ) -> list[Hit]:
        """The ``limit`` chunks nearest to ``vector`` (cosine), through the HNSW index."""
        where, params = _where(owner, filters)
        params.update(q=vector_literal(vector), limit=limit)

        def read(conn: Any) -> list[Hit]:
            rows = conn.run(
                f"SELECT {_HIT_COLUMNS}, c.embedding <=> CAST(:q AS vector) AS distance "
                f"FROM {CHUNKS} c JOIN {DOCUMENTS} d "
                "ON d.owner = c.owner AND d.document_id = c.document_id"
                f"{where} ORDER BY c.embedding <=> CAST(:q AS vector) LIMIT :limit",
                **params,
            )
            hits = [_hit(r, 1.0 - float(r[-1])) for r in rows]
            # relaxed_order may return a filtered scan's rows slightly out of order
            hits.sort(key=lambda h: -h.score)
            for rank, hit in enumerate(hits, 1):
                hit.vector_rank = rank
            return hits

        return self._tolerate_missing(read, [])

    def keyword_search(
        self, owner: str | None, query: str, limit: int, filters: SearchFilters
    ) -> list[Hit]:
        """Chunks matching any of the query's words, ranked by ``ts_rank_cd`` (cover
        density, normalised by document length)."""
        where, params = _where(owner, filters)
        params.update(text=query, limit=limit)
        tsq = (
            f"CAST(replace(CAST(plainto_tsquery('{TS_CONFIG}', :text) AS text), ' & ', ' | ') "
            "AS tsquery)"
        )
        condition = " AND c.tsv @@ q.query" if where else " WHERE c.tsv @@ q.query"

        def read(conn: Any) -> list[Hit]:
            rows = conn.run(
                f"SELECT {_HIT_COLUMNS}, ts_rank_cd(c.tsv, q.query, 1) AS rank "
                f"FROM {CHUNKS} c JOIN {DOCUMENTS} d "
                "ON d.owner = c.owner AND d.document_id = c.document_id "
                f"CROSS JOIN (SELECT {tsq} AS query) q"
                f"{where}{condition} ORDER BY rank DESC, c.id LIMIT :limit",
                **params,
            )
            hits = [_hit(r, float(r[-1])) for r in rows]
            for rank, hit in enumerate(hits, 1):
                hit.keyword_rank = rank
            return hits

        return self._tolerate_missing(read, [])

    def _tolerate_missing(self, work: Callable[[Any], _T], empty: _T) -> _T:
        """``work``; ``empty`` while nothing was ever indexed (no tables yet)."""
        try:
            return self._run(work)
        except pg8000.exceptions.DatabaseError as exc:
            info = exc.args[0] if exc.args else None
            if isinstance(info, dict) and info.get("C") == _UNDEFINED_TABLE:
                return empty
            raise


def hybrid(vector_hits: list[Hit], keyword_hits: list[Hit], k: int) -> list[Hit]:
    """The top ``k`` of both rankings fused by reciprocal rank fusion (score: the RRF sum)."""
    by_id: dict[int, Hit] = {}
    for hit in vector_hits + keyword_hits:
        known = by_id.setdefault(hit.chunk_id, hit)
        known.vector_rank = known.vector_rank or hit.vector_rank
        known.keyword_rank = known.keyword_rank or hit.keyword_rank
    scores = fuse(
        [[h.chunk_id for h in vector_hits], [h.chunk_id for h in keyword_hits]],
        weights=(1.0, KEYWORD_WEIGHT),
    )
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]
    out = []
    for chunk_id, score in ranked:
        hit = by_id[chunk_id]
        hit.score = score
        out.append(hit)
    return out


_DOC_COLUMNS = (
    "owner, document_id, source, kind, title, metadata, content_key, job_id, chunk_count, "
    "created_at, updated_at"
)
_HIT_COLUMNS = "c.id, c.owner, c.document_id, c.chunk_index, c.text, c.metadata, d.source, d.kind"


def _document(row: Sequence[Any]) -> DocumentRecord:
    meta = row[5]
    return DocumentRecord(
        owner=row[0],
        document_id=row[1],
        source=row[2],
        kind=row[3],
        title=row[4],
        metadata=json.loads(meta) if isinstance(meta, str) else (meta or {}),
        content_key=row[6],
        job_id=row[7],
        chunk_count=int(row[8]),
        created_at=row[9],
        updated_at=row[10],
    )


def _hit(row: Sequence[Any], score: float) -> Hit:
    meta = row[5]
    return Hit(
        chunk_id=int(row[0]),
        owner=row[1],
        document_id=row[2],
        chunk_index=int(row[3]),
        text=row[4],
        metadata=json.loads(meta) if isinstance(meta, str) else (meta or {}),
        source=row[6],
        kind=row[7],
        score=score,
    )


def _where(owner: str | None, filters: SearchFilters) -> tuple[str, dict[str, Any]]:
    where: list[str] = []
    params: dict[str, Any] = {}
    if owner is not None:
        where.append("c.owner = :owner")
        params["owner"] = owner
    if filters.kinds:
        where.append("d.kind = ANY(CAST(:kinds AS text[]))")
        params["kinds"] = list(filters.kinds)
    if filters.document_ids:
        where.append("c.document_id = ANY(CAST(:doc_ids AS text[]))")
        params["doc_ids"] = list(filters.document_ids)
    if filters.metadata:
        where.append("d.metadata @> CAST(:meta AS jsonb)")
        params["meta"] = _jsonb(filters.metadata)
    if filters.created_after is not None:
        where.append("d.created_at >= :after")
        params["after"] = filters.created_after
    if filters.created_before is not None:
        where.append("d.created_at < :before")
        params["before"] = filters.created_before
    return (f" WHERE {' AND '.join(where)}" if where else ""), params


def _clean(text: str) -> str:
    # PostgreSQL text holds no NUL character.
    return text.replace("\x00", "")


_NOT_IN_JSONB = re.compile("[\x00\ud800-\udfff]")


def _jsonable(value: Any) -> Any:
    """``value`` as ``jsonb`` can hold it: no NUL character and no unpaired surrogate in any
    string (key or value; a surrogate becomes U+FFFD), no NaN or infinity (null)."""
    if isinstance(value, str):
        return _NOT_IN_JSONB.sub(lambda m: "" if m.group() == "\x00" else "\ufffd", value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_jsonable(str(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _jsonb(value: Any) -> str:
    """JSON text for a ``jsonb`` parameter. Metadata (the client's, a document's) and the
    metadata filters of a search go through the same cleaning, so a filter matches what
    the same input was stored as; PostgreSQL refuses NUL, unpaired surrogates and NaN."""
    return json.dumps(_jsonable(value), default=str, allow_nan=False)


def wait_for_index(store: IndexStore, patience: float, write: Callable[[], _T]) -> _T:
    """Run an index write, retrying while the index is unreachable for up to ``patience``
    seconds (a restart); then the ``TransientError`` goes up (the job is retried later)."""
    deadline = time.monotonic() + patience
    delay = 0.1
    while True:
        try:
            return write()
        except TransientError as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("index unreachable; waiting", error=exc.message)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
