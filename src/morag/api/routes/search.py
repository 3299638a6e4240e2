"""Search the index, and manage the documents in it (per owner)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from morag.api.deps import Caller, authenticate
from morag.api.errors import error_responses
from morag.api.schemas import (
    DocumentId,
    DocumentKind,
    DocumentList,
    DocumentOut,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from morag.services.search import SearchFilters, SearchService

router = APIRouter(prefix="/api/v1", tags=["search"], dependencies=[Depends(authenticate)])


async def get_search(request: Request) -> SearchService:
    return request.app.state.search  # type: ignore[no-any-return]


SearchDep = Annotated[SearchService, Depends(get_search)]


@router.post(
    "/search",
    response_model=SearchResponse,
    summary="Search the indexed chunks",
    responses=error_responses(401, 422, 500, 503),
)
def search(body: SearchRequest, service: SearchDep, principal: Caller) -> SearchResponse:
    """The ``k`` chunks that best answer ``query`` among the caller's documents (an admin
    key: every owner's), with their document, source and place in it."""
    given = body.filters
    filters = SearchFilters(
        kinds=tuple(given.kind or ()) if given else (),
        document_ids=tuple(given.document_ids or ()) if given else (),
        metadata=given.metadata if given else None,
        created_after=given.created_after if given else None,
        created_before=given.created_before if given else None,
    )
    answer = service.search(principal, body.query, body.k, body.mode, filters)
    return SearchResponse(
        query=body.query,
        mode=answer.mode,
        k=body.k,
        took_ms=round(answer.took_ms, 2),
        hits=[
            SearchHit(
                text=h.text,
                score=h.score,
                document_id=h.document_id,
                source=h.source,
                kind=h.kind,
                chunk_index=h.chunk_index,
                location=h.location(),  # type: ignore[arg-type]
                metadata=h.metadata,
                owner=h.owner,
            )
            for h in answer.hits
        ],
    )


@router.get(
    "/documents",
    response_model=DocumentList,
    summary="List documents",
    responses=error_responses(401, 422, 500, 503),
)
def list_documents(
    service: SearchDep,
    principal: Caller,
    kind: DocumentKind | None = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DocumentList:
    """The caller's documents, newest first, a page at a time."""
    items, total = service.list_documents(principal, offset, limit, kind)
    return DocumentList(
        items=[DocumentOut(**d.to_dict()) for d in items],
        total=total,
        offset=offset,
        limit=limit,
        next_offset=offset + len(items) if offset + len(items) < total else None,
    )


@router.get(
    "/documents/{document_id}",
    response_model=DocumentOut,
    summary="A document",
    responses=error_responses(401, 404, 422, 500, 503),
)
def get_document(document_id: DocumentId, service: SearchDep, principal: Caller) -> Any:
    return DocumentOut(**service.get_document(principal, document_id).to_dict())


@router.delete(
    "/documents/{document_id}",
    status_code=204,
    summary="Delete a document and its chunks from the index",
    responses=error_responses(401, 404, 422, 500, 503),
)
def delete_document(document_id: DocumentId, service: SearchDep, principal: Caller) -> Response:
    """Its chunks are no longer found by any search once this answers."""
    service.delete_document(principal, document_id)
    return Response(status_code=204)
