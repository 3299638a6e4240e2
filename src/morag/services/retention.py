"""Storage retention: what a job leaves behind lives no longer than the job needs it.

- Input files a job owns (its upload, a URL it downloaded): deleted once the job is final
  (``sweep_inputs``); with ``keep_inputs_until_expiry``, when its record expires.
- A video job's keyframes (``<artifact dir>/<id>/``): when its record expires
  (``sweep_artifacts``).
- The record, its history and result, dedupe, idempotency and batch keys:
  ``retention_seconds`` after the end, by their Redis TTLs.
- The job's entry in the index (``<prefix>:jobs``): once its record has expired
  (``JobStore.prune_index``, by one worker every ``index_prune_interval``).

Who deletes, and why nothing is lost: every transition to a final state (the worker's
outcome, a claim that finds the job cancelled or out of attempts, the API cancelling a
queued job) queues the job's files for deletion *in the same atomic script* that ends the
job (``files_due`` in services/jobs.py, as webhooks are owed). The janitor in every
worker's maintenance thread deletes what is due and only then drops the entry, so a
process dying at any point leaves the entry to the next sweep (deleting twice is
harmless). The API never deletes a job's input itself: a queued job it cancels may never
be seen by a worker, but its entry is, by any worker's janitor.

Only files the job owns are ever deleted: a record names them in ``owned_files`` (the
API's upload; a download the worker recorded before writing it), and the janitor deletes
nothing outside the upload directory. A path a client submitted directly (a file in
``MORAG_ALLOWED_ROOTS``) is never owned. No two jobs own one file: a duplicate upload
joins the active job and is discarded at once, and a retry takes a hard link (or a copy)
of the failed job's file under a new name (``input_for_retry``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog

from morag.core.errors import InputGoneError
from morag.services.jobs import JobStore

logger = structlog.get_logger(__name__)

#: Due entries read per Redis call while sweeping.
SWEEP_BATCH = 500
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def owned_path(path: str | Path, root: Path) -> Path | None:
    """``path`` as a file name directly or indirectly inside ``root``, or None when it
    is elsewhere (never deleted). The name itself is kept: a symlink is removed, its
    target never followed."""
    candidate = Path(path)
    if not candidate.is_absolute() or candidate.name in ("", ".", ".."):
        return None
    try:
        parent = candidate.parent.resolve()
        resolved_root = root.resolve()
    except (OSError, RuntimeError):
        return None
    inside = parent / candidate.name
    return inside if inside.is_relative_to(resolved_root) and inside != resolved_root else None


def artifact_folder(task_id: str, root: Path) -> Path | None:
    """The keyframe folder of a job, or None for an id that could name anything else."""
    if not _JOB_ID.fullmatch(task_id):
        return None
    return root.resolve() / task_id


@dataclass(frozen=True)
class DueInputs:
    """One entry of the inputs-due set: a job's owned files."""

    raw: bytes
    task_id: str
    files: list[str]

    @classmethod
    def parse(cls, raw: bytes) -> DueInputs:
        try:
            value = json.loads(raw)
            files = value.get("files") or []
            return cls(raw, str(value.get("task_id", "")), [str(f) for f in files])
        except (ValueError, AttributeError):
            return cls(raw, "", [])  # unreadable: dropped, nothing deleted


def input_delay(keep_until_expiry: bool, retention_seconds: int) -> float:
    """Seconds after a job's end before its inputs are deleted."""
    return float(retention_seconds) if keep_until_expiry else 0.0


class StorageJanitor:
    """Deletes the files of ended jobs when due and prunes the job index; runs in every
    worker's maintenance thread (tasks/lifecycle.py). Safe with many workers at once."""

    def __init__(
        self,
        store: JobStore,
        *,
        upload_dir: Path,
        artifact_dir: Path,
        keep_inputs_until_expiry: bool = False,
        index_prune_interval: float = 60.0,
    ) -> None:
        self.store = store
        self.upload_dir = upload_dir
        self.artifact_dir = artifact_dir
        self.input_delay = input_delay(keep_inputs_until_expiry, store.retention_seconds)
        self.index_prune_interval = index_prune_interval

    @property
    def redis(self) -> redis.Redis:
        return self.store.redis

    def run_once(self, now: float | None = None) -> dict[str, int]:
        """One round: inputs and artefacts due, and the index when its period has come."""
        now = time.time() if now is None else now
        return {
            "inputs": self.sweep_inputs(now),
            "artifacts": self.sweep_artifacts(now),
            "index": self.prune_index_if_due(),
        }

    def sweep_inputs(self, now: float | None = None) -> int:
        """Delete the owned inputs of jobs that ended at least ``input_delay`` ago; the
        number of files deleted."""
        cutoff = (time.time() if now is None else now) - self.input_delay
        deleted = 0
        for raws in self._due(self.store.keys.inputs_due, cutoff):
            for entry in map(DueInputs.parse, raws):
                deleted += sum(self._delete_input(path, entry.task_id) for path in entry.files)
            # after the deletions: an entry whose deletion was cut short stays due
            self.redis.zrem(self.store.keys.inputs_due, *raws)
        return deleted

    def sweep_artifacts(self, now: float | None = None) -> int:
        """Delete the keyframe folders of jobs whose records have expired; the number of
        folders deleted."""
        cutoff = (time.time() if now is None else now) - self.store.retention_seconds
        deleted = 0
        for raws in self._due(self.store.keys.artifacts_due, cutoff):
            for raw in raws:
                folder = artifact_folder(raw.decode(errors="replace"), self.artifact_dir)
                if folder is not None and folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                    deleted += 1
            self.redis.zrem(self.store.keys.artifacts_due, *raws)
        return deleted

    def prune_index_if_due(self) -> int:
        """Prune the job index, at most once per ``index_prune_interval`` over all
        workers (the first to take the period's lock does it)."""
        period_ms = int(self.index_prune_interval * 1000)
        if not self.redis.set(self.store.keys.index_prune_lock, "1", nx=True, px=period_ms):
            return 0
        return self.store.prune_index()

    def _due(self, key: str, cutoff: float) -> Iterable[list[bytes]]:
        """Batches of the members of ``key`` due by ``cutoff``, oldest first; the caller
        removes each batch before the next is read."""
        while True:
            raws: list[bytes] = self.redis.zrangebyscore(  # type: ignore[assignment]
                key, "-inf", cutoff, start=0, num=SWEEP_BATCH
            )
            if not raws:
                return
            yield raws
            if len(raws) < SWEEP_BATCH:
                return

    def _delete_input(self, path: str, task_id: str) -> int:
        target = owned_path(path, self.upload_dir)
        if target is None:
            logger.warning("not deleting an input outside the upload dir", path=path)
            return 0
        deleted = 0
        for name in (target, target.with_name(target.name + ".part")):  # and a cut-off download
            try:
                name.unlink()
                deleted += name == target
            except FileNotFoundError:
                pass
            except OSError as exc:  # e.g. shared storage away: this entry is dropped
                logger.warning("could not delete an input", task_id=task_id, error=str(exc))
        return deleted


def input_for_retry(path: Path, new_name: str, *, task_id: str) -> Path:
    """A new name for a failed job's input, for the job that retries it: a hard link
    (a copy where links are not supported), so each job owns the name it deletes.

    Raises InputGoneError when the file was deleted when the job finished.
    """
    target = path.with_name(new_name)
    try:
        os.link(path, target)
    except FileNotFoundError:
        raise input_gone(task_id) from None
    except OSError:  # a file system without hard links
        try:
            shutil.copyfile(path, target)
        except FileNotFoundError:
            target.unlink(missing_ok=True)
            raise input_gone(task_id) from None
    return target


def input_gone(task_id: str) -> InputGoneError:
    """The error a retry answers when the job's input was deleted (HTTP 410)."""
    return InputGoneError(
        f"the uploaded file of job {task_id} was deleted when the job finished: inputs are "
        "kept only while a job is queued or running. Upload the file again as a new job, "
        "or set MORAG_KEEP_INPUTS_UNTIL_EXPIRY=true on the workers to keep inputs as long "
        "as their job's record",
        details={"task_id": task_id, "reason": "input_deleted"},
    )
