"""Video (MP4, MOV, MKV, WEBM, AVI) on the ``video_processing`` queue."""

from __future__ import annotations

from typing import Any

from morag.core.config import settings
from morag.tasks.options import chunking_options, media_input, processor_limits
from morag.tasks.processing import ProcessingTask, processing_task


@processing_task("video")
def process_video_task(
    self: ProcessingTask,
    file_path: str = "",
    metadata: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    url: str = "",
) -> Any:
    """Metadata, keyframes and a transcript of a video (a file, or a URL downloaded first)."""
    from morag.processors.video import process_video

    path = media_input(self, file_path, url)
    assert settings.artifact_dir is not None
    return process_video(
        path,
        artifact_dir=settings.artifact_dir,
        job_id=self.request.id,
        model=settings.whisper_model,
        device=settings.whisper_device,
        compute_type=settings.whisper_compute_type,
        options=chunking_options(options),
        limits=processor_limits(),
        progress=self.progress_callback,
        source_name=(metadata or {}).get("filename") or url or None,
    )
