"""The index store on a real PostgreSQL with pgvector (the session's database, or an
embedded server of the test's own): replace, search, owners, concurrent writers, restarts.
Vectors are made here (random unit vectors), not by the embedding model."""

from __future__ import annotations

import multiprocessing
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from morag.core.embedded_postgres import EmbeddedPostgres
from morag.core.errors import TransientError
from morag.services.search.store import (
    KEYWORD_WEIGHT,
    RRF_K,
    ChunkRow,
    DocumentRecord,
    IndexStore,
    SearchFilters,
    hybrid,
    wait_for_index,
)
from tests.harness import drop_index_database, empty_index, sibling_index_database, wait_for

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def doc(owner: str, doc_id: str, kind: str = "document", **meta: object) -> DocumentRecord:
    return DocumentRecord(
        owner=owner,
        document_id=doc_id,
        source=f"{doc_id}.pdf",
        kind=kind,
        title=doc_id,
        metadata=dict(meta),
        content_key=f"sha256:{doc_id}",
        job_id=str(uuid.uuid4()),
    )


def rows(texts: list[str]) -> list[ChunkRow]:
    return [ChunkRow(i, t, {"pages": [i + 1], "page": i + 1}) for i, t in enumerate(texts)]


@pytest.fixture(scope="module")
def index_url(index_url: str) -> Iterator[str]:
    """A database of this module's own: its vectors are DIM-dimensional, the session's
    index holds the model's."""
    url = sibling_index_database(index_url, f"d{DIM}")
    yield url
    drop_index_database(url)


@pytest.fixture
def store(index_url: str) -> IndexStore:
    empty_index(index_url)
    s = IndexStore(index_url, dim=DIM)
    s.ensure_schema()
    return s


def fresh_owner() -> str:
    return f"team-{uuid.uuid4().hex[:8]}"


def test_vector_keyword_and_hybrid_search_find_the_right_chunk(store: IndexStore) -> None:
    rng = np.random.default_rng(1)
    owner = fresh_owner()
    vectors = unit(rng, 3)
    texts = [
        "The quarterly revenue of the bakery grew by twelve percent.",
        "Penguins huddle together to survive the Antarctic winter.",
        "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    ]
    store.replace_document(doc(owner, "doc_a"), rows(texts), vectors)

    near = store.vector_search(owner, vectors[1] + 0.01, 3, SearchFilters())
    assert [h.chunk_index for h in near][0] == 1
    assert near[0].location()["pages"] == [2]
    assert near[0].source == "doc_a.pdf" and near[0].kind == "document"

    words = store.keyword_search(owner, "how do penguins survive winter?", 3, SearchFilters())
    assert [h.chunk_index for h in words] == [1]  # only that chunk has any of the words

    fused = hybrid(near, words, 2)
    assert fused[0].chunk_index == 1
    # first in both rankings
    assert fused[0].score == pytest.approx((1 + KEYWORD_WEIGHT) / (RRF_K + 1))


def test_replacing_a_document_leaves_only_its_new_chunks(store: IndexStore) -> None:
    rng = np.random.default_rng(2)
    owner = fresh_owner()
    store.replace_document(
        doc(owner, "doc_r"), rows(["old one", "old two", "old three"]), unit(rng, 3)
    )
    store.replace_document(doc(owner, "doc_r"), rows(["new one", "new two"]), unit(rng, 2))
    assert store.chunk_count(owner) == 2
    documents, total = store.list_documents(owner)
    assert total == 1 and documents[0].chunk_count == 2
    assert store.keyword_search(owner, "old", 10, SearchFilters()) == []


def test_owners_filters_and_delete(store: IndexStore) -> None:
    rng = np.random.default_rng(3)
    a, b = fresh_owner(), fresh_owner()
    v = unit(rng, 1)
    store.replace_document(doc(a, "doc_x", project="apollo"), rows(["lunar module"]), v)
    store.replace_document(doc(b, "doc_x", kind="web"), rows(["lunar module"]), v)

    assert [h.owner for h in store.vector_search(a, v[0], 10, SearchFilters())] == [a]
    assert store.get_document(b, "doc_x").kind == "web"  # type: ignore[union-attr]
    assert store.get_document(fresh_owner(), "doc_x") is None
    every = {h.owner for h in store.vector_search(None, v[0], 10, SearchFilters())}
    assert {a, b} <= every  # an admin (owner None) sees both

    by_meta = SearchFilters(metadata={"project": "apollo"})
    assert len(store.keyword_search(None, "lunar", 10, by_meta)) == 1
    assert store.keyword_search(a, "lunar", 10, SearchFilters(kinds=("web",))) == []
    assert len(store.keyword_search(b, "lunar", 10, SearchFilters(kinds=("web",)))) == 1

    assert not store.delete_document(b, "doc_unknown")
    assert store.delete_document(a, "doc_x")
    assert store.vector_search(a, v[0], 10, SearchFilters()) == []
    assert store.chunk_count(b) == 1  # the other owner's document of that id is untouched


def _write_many(url: str, owner: str, worker: int, documents: int) -> None:
    rng = np.random.default_rng(worker)
    s = IndexStore(url, dim=DIM)
    for n in range(documents):
        # every worker also rewrites the shared document: the writes race on one row
        s.replace_document(doc(owner, f"doc_{worker}_{n}"), rows(["a", "b", "c"]), unit(rng, 3))
        s.replace_document(doc(owner, "doc_shared"), rows(["x", "y"]), unit(rng, 2))


def test_two_processes_write_at_once(index_url: str) -> None:
    owner = fresh_owner()
    IndexStore(index_url, dim=DIM).ensure_schema()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(index_url, owner, w, 15)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = IndexStore(index_url, dim=DIM)
    documents, total = store.list_documents(owner, limit=100)
    assert total == 31
    assert store.chunk_count(owner) == 30 * 3 + 2  # the shared document once, not twice


def test_a_store_restart_under_writes_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "index")
    url = server.start()
    try:
        store = IndexStore(url, dim=DIM)
        store.ensure_schema()
        rng = np.random.default_rng(4)
        written: list[str] = []
        waited: list[int] = []
        failures: list[BaseException] = []

        def writer() -> None:
            for n in range(60):
                try:
                    before = len(waited)

                    def write(n: int = n) -> None:
                        try:
                            store.replace_document(
                                doc("o", f"doc_{n}"), rows(["p", "q", "r"]), unit(rng, 3)
                            )
                        except TransientError:
                            waited.append(n)
                            raise

                    wait_for_index(store, 30, write)
                    written.append(f"doc_{n}")
                    del before
                except BaseException as exc:  # the assertion below reports it
                    failures.append(exc)
                    return

        thread = threading.Thread(target=writer)
        thread.start()
        wait_for(lambda: len(written) >= 10, 30, "the first writes")
        server.stop()  # fast shutdown with writes in flight
        server.start()
        thread.join(60)
        assert not failures, failures
        assert len(written) == 60
        assert waited, "no write met the restart: the test proved nothing"
        documents, total = store.list_documents("o", limit=100)
        assert total == 60
        assert store.chunk_count("o") == 180
    finally:
        server.stop()


def test_metadata_postgresql_cannot_hold_is_stored_and_matched_cleaned(store: IndexStore) -> None:
    """NUL characters, unpaired surrogates and NaN are valid in a request's JSON but not in
    jsonb: the document is stored with them cleaned, and a filter with the same input
    (found by the API fuzzer: it answered 500) matches it."""
    rng = np.random.default_rng(5)
    owner, v = fresh_owner(), unit(rng, 1)
    odd = {"a\x00b": "x\x00y", "lone \udb8a": ["\udd1a", float("nan")], "big": 1.5e225}
    store.replace_document(doc(owner, "doc_odd", **odd), rows(["odd metadata"]), v)
    stored = store.get_document(owner, "doc_odd")
    assert stored is not None
    assert stored.metadata["ab"] == "xy" and stored.metadata["lone \ufffd"] == ["\ufffd", None]
    assert len(store.keyword_search(owner, "odd", 10, SearchFilters(metadata=odd))) == 1
    nothing = SearchFilters(metadata={"\x00": {"\udfff": float("inf")}})
    assert store.keyword_search(owner, "odd", 10, nothing) == []
