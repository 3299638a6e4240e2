"""Batches: counts of a batch's jobs by state and its overall progress."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from morag.api.deps import Caller, ServiceDep, authenticate
from morag.api.errors import error_responses
from morag.api.schemas import BatchId, BatchStatus

router = APIRouter(prefix="/api/v1/batches", tags=["batches"], dependencies=[Depends(authenticate)])


@router.get(
    "/{batch_id}",
    response_model=BatchStatus,
    summary="A batch's progress",
    responses=error_responses(401, 404, 422, 500),
)
def get_batch(batch_id: BatchId, service: ServiceDep, principal: Caller) -> dict[str, Any]:
    """Jobs per state, how many finished, and the batch's progress (finished jobs count as
    complete, running ones by their own progress)."""
    return service.reads.batch_status(batch_id, principal)
