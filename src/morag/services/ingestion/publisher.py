"""Publishing a checked submission: the job record first, then the task message, by name.

The API never imports ``morag.tasks`` (nor the processing libraries behind it): it sends
``PROCESSING_TASKS[kind]`` through a Celery app built from its own settings, after writing
the record with its own job store, so both land under the API's ``key_prefix`` and broker.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from celery import Celery

from morag.core.broker import publish_options, publish_recorded
from morag.core.config import DEFAULT_QUEUE, MODALITY_QUEUES, PROCESSING_TASKS
from morag.core.principals import ANONYMOUS_NAME
from morag.core.sent_events import sent_event_batcher
from morag.services.ingestion.specs import JobSpec
from morag.services.jobs import JobStore


class JobPublisher:
    def __init__(self, store: JobStore, celery: Celery) -> None:
        self.store = store
        self.celery = celery

    def publish(
        self,
        spec: JobSpec,
        task_id: str,
        *,
        owner: str,
        batch_id: str | None = None,
        retry_of: str = "",
    ) -> str:
        """Create ``owner``'s record and queue the job, unless identical work of the same
        owner is active: the id of the job that does the work (``task_id`` when this one
        was queued). A retry takes the content key over: identical submissions join it
        from now on."""
        extra = {"content_key": spec.content_key}
        if spec.owned_file:
            # the job's own input: deleted when it ends (services/retention.py)
            extra["owned_files"] = json.dumps([spec.owned_file])
        if spec.webhook_url:
            extra["webhook_url"] = spec.webhook_url
        if batch_id:
            extra["batch_id"] = batch_id
        if retry_of:
            extra["retry_of"] = retry_of
        return self.send(
            PROCESSING_TASKS[spec.kind],
            kind=spec.kind,
            kwargs=spec.kwargs,
            task_id=task_id,
            owner=owner,
            extra=extra,
            dedupe_key=self.store.keys.dedupe(owner, spec.content_key),
            take_over=bool(retry_of),
        )

    def send(
        self,
        task_name: str,
        *,
        kind: str,
        kwargs: dict[str, Any],
        task_id: str | None = None,
        owner: str = ANONYMOUS_NAME,
        extra: dict[str, str] | None = None,
        dedupe_key: str | None = None,
        take_over: bool = False,
        **options: Any,
    ) -> str:
        """Write ``owner``'s record of any task (``extra``: record fields such as
        ``webhook_url``), then send its message by name; with ``dedupe_key``, see
        ``publish``. On morag's transport both go in one Redis call (core/broker.py)."""
        task_id = task_id or str(uuid.uuid4())

        def write_record(push: tuple[str, str] | None) -> str | None:
            return self.store.create_submitted(
                task_id,
                task_name=task_name,
                kind=kind,
                queue=MODALITY_QUEUES.get(kind, DEFAULT_QUEUE),
                kwargs=kwargs,
                owner=owner,
                extra=extra,
                dedupe_key=dedupe_key,
                take_over=take_over,
                push=push,
            )

        def send() -> None:
            self.celery.send_task(
                task_name,
                kwargs=kwargs,
                task_id=task_id,
                event_dispatcher=sent_event_batcher(self.celery),
                # The record holds the result. Sent by name, the task's own ignore_result
                # is unknown here, and Celery would subscribe to a result channel per
                # message.
                ignore_result=True,
                **{**publish_options((), kwargs), **options},
            )

        pending, _ = publish_recorded(self.celery, task_id, write_record, send)
        # identical work is active: that job does it
        return pending.answer if pending.joined else task_id


def kind_of_task(task_name: str) -> str | None:
    """The modality whose task has this name (a retry re-publishes a job's own task)."""
    return next((kind for kind, name in PROCESSING_TASKS.items() if name == task_name), None)
