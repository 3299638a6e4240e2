"""Documents (PDF, Office, HTML, Markdown, text) on the ``document_processing`` queue."""

from __future__ import annotations

from typing import Any

from morag.tasks.options import chunking_options, input_file, processor_limits
from morag.tasks.processing import ProcessingTask, processing_task


@processing_task("document")
def process_document_task(
    self: ProcessingTask,
    file_path: str,
    source_type: str = "document",
    metadata: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Convert a document to Markdown and chunks."""
    from morag.processors.document import process_document

    self.update_progress(0.01, "checking the input", stage="validating")
    path = input_file(file_path)
    return process_document(
        path,
        options=chunking_options(options),
        limits=processor_limits(),
        progress=self.progress_callback,
        declared_name=(metadata or {}).get("filename"),
    )
