"""Web pages on the ``web_processing`` queue."""

from __future__ import annotations

from typing import Any

from morag.core.config import settings
from morag.tasks.options import chunking_options, processor_limits
from morag.tasks.processing import ProcessingTask, processing_task


@processing_task("web")
def process_web_task(
    self: ProcessingTask,
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
