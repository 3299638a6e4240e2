"""Reading jobs: status, result, history, artefacts, the job list, batches, queue stats.

Every read is the caller's: a job or batch of another owner answers exactly as an unknown
id does (404, same message), so ids are no oracle (core/principals.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from morag.core.errors import ConflictError, NotFoundError
from morag.core.principals import ANONYMOUS_NAME, Principal
from morag.services.jobs import FINAL_STATES, JobStore, TaskInfo, TaskStatus

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from morag.services.task_manager import TaskManager

#: Jobs read per round trip while filtering the job list.
LIST_SCAN_PAGE = 200


class JobReads:
    def __init__(
        self,
        store: JobStore,
        task_manager: TaskManager,
        artifact_dir: Path,
        redis_url: str,
    ) -> None:
        self.store = store
        self.task_manager = task_manager
        self.artifact_dir = artifact_dir
        self.redis_url = redis_url
        self._aio: aioredis.Redis | None = None

    @property
    def aio(self) -> aioredis.Redis:
        """An asyncio client for reads that answer a request, made in the serving loop;
        apart from the event streams' client, so streams never use up its connections."""
        if self._aio is None:
            import redis.asyncio as aioredis

            self._aio = aioredis.Redis.from_url(
                self.redis_url, socket_connect_timeout=2, socket_timeout=10
            )
        return self._aio

    async def aclose(self) -> None:
        if self._aio is not None:
            await self._aio.aclose()
            self._aio = None

    def owned(self, task_id: str, principal: Principal) -> TaskInfo:
        """The caller's job; 404 when there is none (or it is another owner's)."""
        info = self.store.get(task_id)
        if info is None or not principal.may_see(info.owner):
            raise not_found(task_id)
        return info

    async def record(self, task_id: str, principal: Principal) -> TaskInfo | None:
        """The caller's job record, read in the event loop (one round trip, no thread
        hop); None when there is none the caller may see."""
        info = await self.store.aget(self.aio, task_id)
        return info if info is not None and principal.may_see(info.owner) else None

    async def astatus(self, task_id: str, principal: Principal) -> TaskInfo:
        """The caller's job. An id without a record (a task a raw Celery client sent) is
        looked up in Celery's result backend for a caller who may see every owner's."""
        info = await self.store.aget(self.aio, task_id)
        if info is not None and principal.may_see(info.owner):
            return info
        if info is not None or not principal.admin:
            raise not_found(task_id)
        # The TaskManager asks Celery's result backend through its blocking client, so off
        # the event loop.
        return await asyncio.to_thread(self.task_manager.get_task_status, task_id)

    def history(self, task_id: str, principal: Principal) -> list[dict[str, Any]]:
        self.owned(task_id, principal)
        return self.store.history(task_id)

    def artifact_path(self, task_id: str, name: str, principal: Principal) -> tuple[Path, str]:
        """The file of one of a finished job's artefacts (a keyframe) and its media type."""
        self.owned(task_id, principal)
        result = self.store.result(task_id)
        if result is None:
            raise NotFoundError(f"job {task_id} has no stored result")
        for artifact in result.get("artifacts") or []:
            if artifact.get("name") == name:
                root = self.artifact_dir.resolve()
                path = (root / artifact["path"]).resolve()
                if path.is_relative_to(root) and path.is_file():
                    return path, artifact.get("media_type") or "application/octet-stream"
                raise NotFoundError(f"artefact {name} of job {task_id} is no longer stored")
        raise NotFoundError(f"job {task_id} has no artefact named {name}")

    def result(
        self,
        task_id: str,
        principal: Principal,
        *,
        offset: int,
        limit: int,
        include_markdown: bool = True,
    ) -> dict[str, Any]:
        """The job's Markdown, metadata and one page of its chunks; 409 unless it succeeded."""
        info = self.owned(task_id, principal)
        if info.status is not TaskStatus.SUCCESS:
            raise ConflictError(
                f"job {task_id} has no result: it is {info.status.value}"
                + ("" if info.status.is_final else "; wait for it to finish"),
                details={"status": info.status.value},
            )
        result = self.store.result(task_id)
        if result is None:
            raise NotFoundError(f"the result of job {task_id} is no longer stored")
        chunks = result.get("chunks") or []
        page = chunks[offset : offset + limit]
        return {
            "task_id": task_id,
            "kind": result.get("kind", info.kind),
            "markdown": result.get("markdown", "") if include_markdown else None,
            "metadata": result.get("metadata") or {},
            "artifacts": result.get("artifacts") or [],
            "chunks": page,
            "total_chunks": len(chunks),
            "offset": offset,
            "limit": limit,
            "next_offset": offset + limit if offset + limit < len(chunks) else None,
        }

    def list_jobs(
        self,
        principal: Principal,
        *,
        owner: str | None = None,
        states: Iterable[TaskStatus] = (),
        kind: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> tuple[list[TaskInfo], int | None]:
        """The caller's jobs newest first, filtered; returns a page and the offset of the
        next one. ``owner`` narrows the list of a caller who may see every owner's.

        Time bounds use the index of creation times (one per owner); state and kind are
        checked on the records, reading them a page at a time.
        """
        index_owner = owner if principal.admin else principal.name
        wanted = set(states)
        start = _epoch(created_after)
        end = _epoch(created_before)
        if start and end and start > end:
            return [], None
        filtered = bool(wanted or kind)
        found: list[TaskInfo] = []
        skipped = 0
        scan_offset = 0 if filtered else offset
        while True:
            page_size = LIST_SCAN_PAGE if filtered else limit + 1
            ids = self.store.list_ids(
                start=start, end=end, offset=scan_offset, count=page_size, owner=index_owner
            )
            for info in self.store.get_many(ids):
                if info is None:
                    continue  # its record expired; the index entry goes at the next prune
                if (wanted and info.status not in wanted) or (kind and info.kind != kind):
                    continue
                if filtered and skipped < offset:
                    skipped += 1
                    continue
                found.append(info)
                if len(found) > limit:
                    return found[:limit], offset + limit
            if len(ids) < page_size or not filtered:
                return found[:limit], None
            scan_offset += page_size

    def batch_status(self, batch_id: str, principal: Principal) -> dict[str, Any]:
        """Counts of the batch's jobs by state and the batch's overall progress."""
        raw = self.store.redis.get(self.store.keys.batch(batch_id))
        batch = json.loads(raw) if raw is not None else None
        if batch is None or not principal.may_see(batch.get("owner", ANONYMOUS_NAME)):
            raise NotFoundError(f"no batch with id {batch_id}")
        task_ids: list[str] = batch["task_ids"]
        counts: dict[str, int] = {state.value: 0 for state in TaskStatus}
        counts["expired"] = 0
        progress = 0.0
        finished = 0
        for info in self.store.get_many(task_ids):
            if info is None:
                counts["expired"] += 1
                finished += 1
                progress += 1.0
                continue
            counts[info.status.value] += 1
            if info.status in FINAL_STATES:
                finished += 1
                progress += 1.0  # a failed or cancelled job is as done as it will get
            else:
                progress += info.progress
        total = len(task_ids)
        return {
            "batch_id": batch_id,
            "created_at": batch["created_at"],
            "total": total,
            "counts": counts,
            "finished": finished,
            "progress": round(progress / total, 4) if total else 1.0,
            "done": finished == total,
            "task_ids": task_ids,
        }

    def queue_stats(self) -> dict[str, Any]:
        return self.task_manager.get_queue_stats()


def not_found(task_id: str) -> NotFoundError:
    """The one answer for an unknown id and for another owner's."""
    return NotFoundError(f"no job with id {task_id}")


def _epoch(value: datetime | None) -> float:
    if value is None:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
