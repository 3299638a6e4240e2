"""Request and response models of the ingestion API (the OpenAPI document is built from them).

Request models forbid unknown fields, so a misspelt option is a 422 naming it rather than
a silently ignored setting. Storage shapes (``TaskInfo``, history events) live in
``morag.services.jobs``; these models are what clients see.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from morag.services.jobs import TaskStatus

FileSourceType = Literal["document", "audio", "video"]
UrlSourceType = Literal["web", "audio", "video"]
JobKind = Literal["document", "audio", "video", "web", "system"]

MAX_URL_CHARS = 8192
MAX_WEBHOOK_URL_CHARS = 2048

#: The ids the API issues for jobs and batches: lower-case hyphenated UUIDs. Anything else
#: is refused at the edge (422) before it can name a Redis key.
ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
is_issued_id = re.compile(ID_PATTERN).match

TaskId = Annotated[
    str,
    Path(
        pattern=ID_PATTERN,
        description="a job's id, as the API issued it (a lower-case UUID)",
        examples=["3f2b8a9e-1c4d-4e5f-9a6b-7c8d9e0f1a2b"],
    ),
]
BatchId = Annotated[
    str,
    Path(
        pattern=ID_PATTERN,
        description="a batch's id, as the API issued it (a lower-case UUID)",
        examples=["3f2b8a9e-1c4d-4e5f-9a6b-7c8d9e0f1a2b"],
    ),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChunkingOptionsIn(_Request):
    """Chunk sizes in tokens, and whether to index; the server's defaults apply to what is
    left out."""

    chunk_size_tokens: int | None = Field(None, ge=16, le=8192)
    chunk_overlap_tokens: int | None = Field(None, ge=0, le=4096)
    index: bool | None = Field(
        None,
        description="embed the chunks and add them to the search index (default true); "
        "false keeps the job to Markdown and chunks",
    )


class UrlIngestRequest(_Request):
    """A web page to ingest, or audio or video the worker downloads (``source_type``)."""

    url: str = Field(
        ..., min_length=1, max_length=MAX_URL_CHARS, examples=["https://example.com/article"]
    )
    source_type: UrlSourceType = "web"
    metadata: dict[str, Any] | None = Field(
        None, description="free-form JSON object stored with the job and its result"
    )
    webhook_url: str | None = Field(
        None,
        max_length=MAX_WEBHOOK_URL_CHARS,
        description="http(s) URL that receives the job's events (same SSRF checks as url)",
    )
    options: ChunkingOptionsIn | None = None


class BatchRequest(_Request):
    """A batch of URLs as JSON. Files go in a ``multipart/form-data`` batch instead."""

    items: list[UrlIngestRequest] = Field(..., min_length=1)


class SubmissionResponse(BaseModel):
    task_id: str
    status: TaskStatus
    message: str


class RetryResponse(SubmissionResponse):
    retry_of: str


class BatchSubmissionResponse(BaseModel):
    batch_id: str
    task_ids: list[str]
    message: str


class JobError(BaseModel):
    type: str | None
    message: str


class JobStatus(BaseModel):
    """A job as its record tells it; ``result`` is the summary (see ``/result``)."""

    task_id: str
    status: TaskStatus
    kind: str
    queue: str
    progress: float = Field(..., ge=0, le=1)
    stage: str
    message: str
    attempts: int
    error: JobError | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None
    cancel_requested: bool
    result: dict[str, Any] | None
    metadata: dict[str, Any]
    batch_id: str | None
    retry_of: str | None
    webhook_url: str | None = Field(
        ..., description="the webhook's target without user info, query and fragment"
    )
    owner: str = Field(..., description="the name of the API key that submitted the job")


class JobList(BaseModel):
    items: list[JobStatus]
    offset: int
    limit: int
    next_offset: int | None = Field(
        ..., description="offset of the next page; null when this page is the last"
    )


class HistoryEvent(BaseModel):
    """One state change or progress step. Other event kinds may add fields."""

    model_config = ConfigDict(extra="allow")

    ts: datetime
    state: str
    progress: float | None = None
    stage: str | None = None
    message: str | None = None
    attempt: int | None = None


class JobHistory(BaseModel):
    task_id: str
    events: list[HistoryEvent]


class ChunkOut(BaseModel):
    index: int
    text: str
    tokens: int
    metadata: dict[str, Any]


class JobResult(BaseModel):
    task_id: str
    kind: str
    markdown: str | None = Field(..., description="null when include_markdown=false")
    metadata: dict[str, Any]
    artifacts: list[dict[str, Any]]
    chunks: list[ChunkOut]
    total_chunks: int
    offset: int
    limit: int
    next_offset: int | None


class CancelResponse(BaseModel):
    task_id: str
    outcome: Literal["revoked", "cancelling"] = Field(
        ...,
        description="revoked: it was queued and will not run; cancelling: it is "
        "running and stops within seconds",
    )
    status: TaskStatus
    message: str


class BatchStatus(BaseModel):
    batch_id: str
    created_at: datetime
    total: int
    counts: dict[str, int] = Field(
        ..., description="jobs per state; 'expired' counts jobs whose record is gone"
    )
    finished: int
    progress: float = Field(..., ge=0, le=1)
    done: bool
    task_ids: list[str]


class QueueInfo(BaseModel):
    pending: int
    consumers: int
    workers: list[str]


class QueueStats(BaseModel):
    queues: dict[str, QueueInfo]
    pending_total: int
    in_flight: int
    active_tasks: int
    workers: list[str]
    worker_details: list[dict[str, Any]]


# --- search and documents -------------------------------------------------------------------

#: A document's id: ``doc_`` and 24 hex digits (services/search/documents.py).
DOCUMENT_ID_PATTERN = r"^doc_[0-9a-f]{24}$"

DocumentId = Annotated[
    str,
    Path(
        pattern=DOCUMENT_ID_PATTERN,
        description="a document's id, as a job's result gave it",
        examples=["doc_3f2b8a9e1c4d4e5f9a6b7c8d"],
    ),
]
DocumentKind = Literal["document", "audio", "video", "web"]


class SearchFiltersIn(_Request):
    """Every filter given must hold (AND)."""

    kind: list[DocumentKind] | None = Field(None, description="only these kinds of input")
    document_ids: list[Annotated[str, Field(pattern=DOCUMENT_ID_PATTERN)]] | None = Field(
        None, max_length=1000, description="only these documents"
    )
    metadata: dict[str, Any] | None = Field(
        None,
        description="equality on the metadata sent with the input (JSON containment: every "
        "key given must have that value)",
    )
    created_after: datetime | None = Field(None, description="inclusive; UTC if no zone")
    created_before: datetime | None = Field(None, description="exclusive; UTC if no zone")


class SearchRequest(_Request):
    query: str = Field(..., min_length=1, max_length=2000, examples=["how do penguins keep warm"])
    k: int = Field(10, ge=1, le=100, description="how many hits")
    mode: Literal["hybrid", "vector", "keyword"] = Field(
        "hybrid",
        description="hybrid: vector and keyword rankings fused by weighted reciprocal rank "
        "fusion (docs/search.md); vector: nearest chunks by cosine similarity; keyword: "
        "full-text ranking (ts_rank_cd)",
    )
    filters: SearchFiltersIn | None = None


class HitLocation(BaseModel):
    pages: list[int] | None = None
    heading_path: list[str] | None = None
    start_seconds: float | None = None
    end_seconds: float | None = None


class SearchHit(BaseModel):
    text: str
    score: float = Field(
        ...,
        description="hybrid: the RRF sum; vector: cosine similarity; keyword: ts_rank_cd",
    )
    document_id: str
    source: str = Field(..., description="the file name the client gave, or the URL")
    kind: str
    chunk_index: int
    location: HitLocation
    metadata: dict[str, Any] = Field(..., description="the chunk's metadata")
    owner: str


class SearchResponse(BaseModel):
    query: str
    mode: str
    k: int
    hits: list[SearchHit]
    took_ms: float


class DocumentOut(BaseModel):
    document_id: str
    owner: str
    source: str
    kind: str
    title: str | None
    metadata: dict[str, Any]
    job_id: str | None = Field(..., description="the job that last wrote it")
    chunk_count: int
    created_at: datetime | None
    updated_at: datetime | None


class DocumentList(BaseModel):
    items: list[DocumentOut]
    total: int
    offset: int
    limit: int
    next_offset: int | None
