"""Search and documents: what the API does with the index, without HTTP.

The API never imports processors itself (the layering contracts): this service loads the
embedding model for queries, lazily, on the first search of the API process, and holds the
index store (``store.py``). Every call takes the caller's ``Principal``: an owner sees and
searches their own documents, an admin key every owner's; another owner's document answers
like an unknown one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

from morag.core.config import Settings
from morag.core.errors import NotFoundError
from morag.core.principals import Principal
from morag.services.search.store import (
    DocumentRecord,
    Hit,
    IndexStore,
    SearchFilters,
    hybrid,
)

__all__ = ["Hit", "SearchFilters", "SearchService", "DocumentRecord"]

SearchMode = Literal["hybrid", "vector", "keyword"]
#: Candidates each ranking contributes to a hybrid search (at least k).
HYBRID_CANDIDATES = 100


@dataclass
class SearchAnswer:
    hits: list[Hit]
    mode: str
    took_ms: float


class SearchService:
    def __init__(self, cfg: Settings) -> None:
        self.settings = cfg
        self.store = IndexStore(cfg.index_url, ef_search=cfg.index_ef_search)
        self._embedder: Any = None
        self._lock = threading.Lock()

    def embedder(self) -> Any:
        """The query embedder (the workers' model), loaded on first use."""
        if self._embedder is None:
            with self._lock:
                if self._embedder is None:
                    from morag.processors.embedding import load_embedder

                    self._embedder = load_embedder(
                        self.settings.embedding_model_path or None,
                        self.settings.embedding_batch_size,
                        self.settings.embedding_threads,
                    )
        return self._embedder

    @staticmethod
    def _owner(principal: Principal) -> str | None:
        return None if principal.admin else principal.name

    def search(
        self,
        principal: Principal,
        query: str,
        k: int = 10,
        mode: SearchMode = "hybrid",
        filters: SearchFilters | None = None,
    ) -> SearchAnswer:
        import time

        started = time.perf_counter()
        filters = filters or SearchFilters()
        owner = self._owner(principal)
        vector_hits: list[Hit] = []
        keyword_hits: list[Hit] = []
        depth = k if mode != "hybrid" else max(k, HYBRID_CANDIDATES)
        if mode in ("vector", "hybrid"):
            vector = self.embedder().embed_query(query)
            vector_hits = self.store.vector_search(owner, vector, depth, filters)
        if mode in ("keyword", "hybrid"):
            keyword_hits = self.store.keyword_search(owner, query, depth, filters)
        if mode == "vector":
            hits = vector_hits[:k]
        elif mode == "keyword":
            hits = keyword_hits[:k]
        else:
            hits = hybrid(vector_hits, keyword_hits, k)
        return SearchAnswer(hits, mode, (time.perf_counter() - started) * 1000)

    def list_documents(
        self, principal: Principal, offset: int, limit: int, kind: str | None = None
    ) -> tuple[list[DocumentRecord], int]:
        return self.store.list_documents(self._owner(principal), offset, limit, kind)

    def get_document(self, principal: Principal, document_id: str) -> DocumentRecord:
        found = self.store.get_document(self._owner(principal), document_id)
        if found is None:
            raise NotFoundError(f"no document {document_id}", details={"document_id": document_id})
        return found

    def delete_document(self, principal: Principal, document_id: str) -> None:
        if not self.store.delete_document(self._owner(principal), document_id):
            raise NotFoundError(f"no document {document_id}", details={"document_id": document_id})

    def close(self) -> None:
        self.store.close()
