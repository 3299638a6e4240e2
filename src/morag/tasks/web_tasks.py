"""Web pages on the ``web_processing`` queue."""

from __future__ import annotations

from typing import Any

from morag.core.celery_app import celery_app
from morag.core.config import settings
from morag.tasks.options import chunking_options, processor_limits
from morag.tasks.processing import ProcessingTask


class WebTask(ProcessingTask):
    abstract = True
    kind = "web"


@celery_app.task(
    bind=True,
    base=WebTask,
    soft_time_limit=settings.soft_time_limit("web_processing"),
    time_limit=settings.hard_time_limit("web_processing"),
)
def process_web_task(
    self: WebTask,
    url: str,
    metadata: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Fetch a page (SSRF-guarded) and extract its main content."""
    from morag.core.url_guard import UrlPolicy
    from morag.processors.web import process_web

    self.update_progress(0.01, "checking the URL", stage="validating")
    return process_web(
        url,
        policy=UrlPolicy.from_settings(settings),
        options=chunking_options(options),
        limits=processor_limits(),
        progress=self.progress_callback,
    )
