"""Audio (WAV, MP3, M4A, FLAC, OGG) on the ``audio_processing`` queue."""

from __future__ import annotations

from typing import Any

from morag.core.config import settings
from morag.tasks.options import chunking_options, media_input, processor_limits
from morag.tasks.processing import ProcessingTask, processing_task


@processing_task("audio")
def process_audio_task(
    self: ProcessingTask,
    file_path: str = "",
    metadata: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    url: str = "",
) -> Any:
    """Transcribe speech to Markdown and time-stamped chunks (of a file, or of a URL
    downloaded first)."""
    from morag.processors.audio import process_audio

    path = media_input(self, file_path, url)
    return process_audio(
        path,
        model=settings.whisper_model,
        device=settings.whisper_device,
        compute_type=settings.whisper_compute_type,
        options=chunking_options(options),
        limits=processor_limits(),
        progress=self.progress_callback,
        source_name=(metadata or {}).get("filename") or url or None,
    )
