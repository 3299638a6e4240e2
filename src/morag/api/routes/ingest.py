"""Submitting work: a file, a URL, a batch; cancelling and retrying a job.

Routes stay thin: they read the request, call the ingestion parts (services/ingestion/)
and shape the answer. Multipart bodies are read by ``services/uploads.py``, which streams
files into the upload directory, so these routes declare their form bodies in
``openapi_extra`` rather than as FastAPI ``File``/``Form`` parameters (those would spool
every upload to a temporary file first).
"""

from __future__ import annotations

from typing import Any

import pydantic_core
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from morag.api.deps import (
    Caller,
    IdempotencyKey,
    ServiceDep,
    SettingsDep,
    authenticate,
)
from morag.api.errors import error_responses
from morag.api.schemas import (
    MAX_WEBHOOK_URL_CHARS,
    BatchRequest,
    BatchSubmissionResponse,
    CancelResponse,
    FileSourceType,
    RetryResponse,
    SubmissionResponse,
    TaskId,
    UrlIngestRequest,
    _Request,
)
from morag.core.config import Settings
from morag.core.errors import InvalidInputError
from morag.core.private_files import private_directory
from morag.services.ingestion import IngestionService, JobSpec, Submission
from morag.services.uploads import ReceivedForm, StoredFile, receive_form

router = APIRouter(prefix="/api/v1/ingest", tags=["ingest"], dependencies=[Depends(authenticate)])

_LOCATION = {"Location": {"description": "the job's status URL", "schema": {"type": "string"}}}
_FORM_FIELD_BYTES_EXTRA = 4096  # room around the metadata JSON in a form field


class FileFields(_Request):
    """The text fields of a file upload (besides ``file``); unknown fields are refused."""

    source_type: FileSourceType | None = None
    metadata: str | None = None
    webhook_url: str | None = None
    chunk_size_tokens: int | None = None
    chunk_overlap_tokens: int | None = None
    index: bool | None = None


class BatchFormFields(FileFields):
    items: str | None = None


_FILE_FIELDS_SCHEMA: dict[str, Any] = {
    "source_type": {
        "type": "string",
        "enum": ["document", "audio", "video"],
        "description": "detected from the file's content when absent",
    },
    "metadata": {
        "type": "string",
        "description": "a JSON object, stored with the job",
        "examples": ['{"project": "handbook"}'],
    },
    "webhook_url": {
        "type": "string",
        "maxLength": MAX_WEBHOOK_URL_CHARS,
        "description": "http(s) URL that receives the job's events",
    },
    "chunk_size_tokens": {"type": "integer", "minimum": 16, "maximum": 8192},
    "chunk_overlap_tokens": {"type": "integer", "minimum": 0, "maximum": 4096},
    "index": {
        "type": "boolean",
        "description": "embed the chunks and add them to the search index (default true)",
    },
}

_FILE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "the document, audio or video file",
                    },
                    **_FILE_FIELDS_SCHEMA,
                },
            }
        }
    },
}

_BATCH_JSON_SCHEMA = BatchRequest.model_json_schema(ref_template="#/components/schemas/{model}")
_BATCH_JSON_SCHEMA.pop("$defs", None)  # UrlIngestRequest & co. are components already

_BATCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": _BATCH_JSON_SCHEMA},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "files; the other fields apply to each of them",
                    },
                    "items": {
                        "type": "string",
                        "description": "a JSON array of URL items, each shaped like the "
                        "JSON body's items",
                    },
                    **_FILE_FIELDS_SCHEMA,
                },
            }
        },
    },
}


def _fields(model: type[FileFields], form: ReceivedForm) -> FileFields:
    """Validate the form's text fields (the last value of a repeated field wins)."""
    values = {name: vals[-1] for name, vals in form.fields.items() if vals[-1].strip() != ""}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from None


def accepted_headers(submission: Submission) -> dict[str, str]:
    """The headers of a 202 for a submission: where its status is read, and whether it was
    answered from an earlier request's Idempotency-Key."""
    headers = {"Location": f"/api/v1/status/{submission.task_id}"}
    if submission.replayed:
        headers["Idempotent-Replayed"] = "true"
    return headers


def _accepted(response: Response, request: Request, submission: Submission) -> None:
    response.headers.update(accepted_headers(submission))
    request.state.task_id = submission.task_id


def prepare_url(
    service: IngestionService, body: UrlIngestRequest, field_prefix: str = ""
) -> JobSpec:
    """``prepare_url`` for one URL request body (the route, its fast path, batch items)."""
    return service.checks.prepare_url(
        body.url,
        source_type=body.source_type,
        metadata=body.metadata,
        webhook_url=body.webhook_url,
        options=body.options.model_dump() if body.options else None,
        field_prefix=field_prefix,
    )


def _file_options(fields: FileFields) -> dict[str, Any]:
    return {
        "chunk_size_tokens": fields.chunk_size_tokens,
        "chunk_overlap_tokens": fields.chunk_overlap_tokens,
        "index": fields.index,
    }


def _prepare_files(
    service: IngestionService, files: list[StoredFile], fields: FileFields
) -> list[JobSpec]:
    metadata = service.checks.parse_metadata(fields.metadata)
    specs = []
    for stored in files:
        try:
            specs.append(
                service.checks.prepare_file(
                    stored,
                    source_type=fields.source_type,
                    metadata=metadata,
                    webhook_url=fields.webhook_url,
                    options=_file_options(fields),
                )
            )
        except InvalidInputError as exc:
            if len(files) > 1 or stored.field != "file":
                exc.details = {"file": stored.client_name, **exc.details}
            raise
    return specs


async def _receive(
    request: Request, settings: Settings, max_files: int, max_field_bytes: int = 0
) -> ReceivedForm:
    assert settings.upload_dir is not None
    private_directory(settings.upload_dir)
    return await receive_form(
        request.headers.get("content-type", ""),
        request.stream(),
        upload_dir=settings.upload_dir,
        max_file_bytes=settings.max_upload_bytes,
        max_files=max_files,
        max_field_bytes=max_field_bytes or settings.max_metadata_bytes + _FORM_FIELD_BYTES_EXTRA,
    )


@router.post(
    "/file",
    status_code=202,
    response_model=SubmissionResponse,
    summary="Upload a document, audio or video file",
    responses={202: {"headers": _LOCATION}, **error_responses(401, 413, 415, 422, 500)},
    openapi_extra={"requestBody": _FILE_BODY},
)
async def ingest_file(
    request: Request,
    response: Response,
    service: ServiceDep,
    settings: SettingsDep,
    principal: Caller,
    idempotency_key: IdempotencyKey = None,
) -> SubmissionResponse:
    """Stream the upload to the upload directory (413 over ``max_upload_bytes``), check its
    type from its bytes (415 when morag cannot process it, 422 when empty) and queue it."""
    form = await _receive(request, settings, max_files=1)
    try:
        fields = _fields(FileFields, form)
        uploads = [f for f in form.files if f.field == "file"]
        if len(form.files) != len(uploads) or not uploads:
            raise InvalidInputError(
                "send the file in the form field 'file'", details={"field": "file"}
            )
        spec = (await run_in_threadpool(_prepare_files, service, uploads, fields))[0]
        submission = await run_in_threadpool(
            service.submissions.submit, spec, principal=principal, idempotency_key=idempotency_key
        )
    except BaseException:
        form.discard()
        raise
    _accepted(response, request, submission)
    return SubmissionResponse(
        task_id=submission.task_id, status=submission.status, message=submission.message
    )


@router.post(
    "/url",
    status_code=202,
    response_model=SubmissionResponse,
    summary="Ingest a web page, or audio or video from a URL",
    responses={202: {"headers": _LOCATION}, **error_responses(401, 413, 422, 500)},
)
async def ingest_url(
    body: UrlIngestRequest,
    request: Request,
    response: Response,
    service: ServiceDep,
    principal: Caller,
    idempotency_key: IdempotencyKey = None,
) -> SubmissionResponse:
    """Check the URL (http/https, SSRF guard: 422 when forbidden) and queue it. With
    ``source_type`` audio or video the worker downloads the media (through the same guard)
    and processes it like an upload."""
    # prepare_url does no I/O (the guard checks without DNS), so it runs in the loop.
    spec = prepare_url(service, body)
    submission = await service.submissions.asubmit(
        spec, principal=principal, idempotency_key=idempotency_key
    )
    _accepted(response, request, submission)
    return SubmissionResponse(
        task_id=submission.task_id, status=submission.status, message=submission.message
    )


@router.post(
    "/batch",
    status_code=202,
    response_model=BatchSubmissionResponse,
    summary="Submit many files and/or URLs at once",
    responses={
        202: {
            "headers": {
                "Location": {"description": "the batch's status URL", "schema": {"type": "string"}}
            }
        },
        **error_responses(401, 413, 415, 422, 500),
    },
    openapi_extra={"requestBody": _BATCH_BODY},
)
async def ingest_batch(
    request: Request,
    response: Response,
    service: ServiceDep,
    settings: SettingsDep,
    principal: Caller,
    idempotency_key: IdempotencyKey = None,
) -> BatchSubmissionResponse:
    """Up to ``batch_max_items`` items: a JSON body ``{"items": [{"url": ...}, ...]}``, or a
    multipart form with ``files`` (and optionally ``items``, a JSON array of URL items).
    Every item is checked before any is queued: one bad item refuses the whole batch, and
    the error's details name it. Answers the batch id and one job id per item, in order."""
    form: ReceivedForm | None = None
    files: list[StoredFile] = []
    fields = FileFields()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        url_items = await _json_batch(request)
    else:
        # The items field may hold a whole batch of URL items, each with its metadata.
        max_field = settings.batch_max_items * (settings.max_metadata_bytes + 16 * 1024)
        form = await _receive(request, settings, settings.batch_max_items, max_field)
    try:
        if form is not None:
            form_fields = _fields(BatchFormFields, form)
            assert isinstance(form_fields, BatchFormFields)
            url_items = _form_url_items(form_fields.items)
            fields, files = form_fields, form.files
            if any(f.field != "files" for f in files):
                raise InvalidInputError(
                    "send the batch's files in the form field 'files'", details={"field": "files"}
                )
        service.checks.check_batch_size(len(files) + len(url_items))
        specs = await run_in_threadpool(_prepare_files, service, files, fields)
        for index, item in enumerate(url_items):
            specs.append(prepare_url(service, item, field_prefix=f"items.{index}."))
        batch = await run_in_threadpool(
            service.submissions.submit_batch,
            specs,
            principal=principal,
            idempotency_key=idempotency_key,
        )
    except BaseException:
        if form is not None:
            form.discard()
        raise
    response.headers["Location"] = f"/api/v1/batches/{batch.batch_id}"
    if batch.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    duplicates = sum(1 for s in batch.submissions if s.duplicate)
    message = f"{len(batch.task_ids)} items queued" + (
        f" ({duplicates} joined identical jobs already queued or running)" if duplicates else ""
    )
    if batch.replayed:
        message = "repeated request (same Idempotency-Key): this is the original batch"
    return BatchSubmissionResponse(
        batch_id=batch.batch_id, task_ids=batch.task_ids, message=message
    )


async def _json_batch(request: Request) -> list[UrlIngestRequest]:
    body = await request.body()
    try:
        return BatchRequest.model_validate_json(body).items
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from None


def _form_url_items(text: str | None) -> list[UrlIngestRequest]:
    if not text:
        return []
    try:
        return BatchRequest.model_validate_json(f'{{"items": {text}}}').items
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            try:  # parsed alone, so the place it names is in the field's own text
                pydantic_core.from_json(text)
            except ValueError as broken:
                raise InvalidInputError(
                    f"the items field is not valid JSON: {broken}", details={"field": "items"}
                ) from None
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from None


@router.delete(
    "/{task_id}",
    status_code=202,
    response_model=CancelResponse,
    summary="Cancel a job",
    responses=error_responses(401, 404, 409, 422, 500),
)
def cancel_job(
    task_id: TaskId, request: Request, service: ServiceDep, principal: Caller
) -> CancelResponse:
    """A queued job is revoked at once; a running one stops within seconds. 409 when the
    job has already finished."""
    request.state.task_id = task_id
    outcome, status = service.submissions.cancel(task_id, principal)
    message = (
        "cancelled before it started"
        if outcome == "revoked"
        else "cancellation requested; the job stops within seconds"
    )
    return CancelResponse(
        task_id=task_id,
        outcome=outcome,  # type: ignore[arg-type]
        status=status,
        message=message,
    )


@router.post(
    "/{task_id}/retry",
    status_code=202,
    response_model=RetryResponse,
    summary="Re-run a failed or cancelled job as a new job",
    responses={202: {"headers": _LOCATION}, **error_responses(401, 404, 409, 410, 422, 500)},
)
def retry_job(
    task_id: TaskId,
    request: Request,
    response: Response,
    service: ServiceDep,
    principal: Caller,
    idempotency_key: IdempotencyKey = None,
) -> RetryResponse:
    """Queues the job's original input and options again as a new job whose ``retry_of``
    is this one. 409 unless the job failed or was cancelled, or when it was retried
    already; 410 when its uploaded file was deleted when it finished (inputs are kept
    while a job is active, or until its record expires with
    ``MORAG_KEEP_INPUTS_UNTIL_EXPIRY``)."""
    submission = service.submissions.retry(
        task_id, principal=principal, idempotency_key=idempotency_key
    )
    _accepted(response, request, submission)
    return RetryResponse(
        task_id=submission.task_id,
        status=submission.status,
        message=submission.message,
        retry_of=task_id,
    )
