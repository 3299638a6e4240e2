"""Processor arguments built from settings and a job's options (validated here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from morag.core.config import settings
from morag.core.errors import InvalidInputError
from morag.processors.base import ChunkingOptions, ProcessorLimits, ensure_inside


def chunking_options(options: dict[str, Any] | None) -> ChunkingOptions:
    """Chunk sizes from the job's options, defaulting to the settings."""
    options = options or {}
    try:
        return ChunkingOptions(
            chunk_tokens=int(options.get("chunk_size_tokens", settings.chunk_size_tokens)),
            overlap_tokens=int(options.get("chunk_overlap_tokens", settings.chunk_overlap_tokens)),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"invalid chunking options: {exc}") from exc


def processor_limits() -> ProcessorLimits:
    return ProcessorLimits(
        max_bytes=settings.max_upload_bytes,
        max_pages=settings.max_document_pages,
        max_media_seconds=settings.max_media_seconds,
        web_timeout_seconds=settings.web_timeout_seconds,
        web_max_redirects=settings.web_max_redirects,
        web_max_bytes=settings.max_web_bytes,
        max_keyframes=settings.max_keyframes,
        keyframe_interval_seconds=settings.keyframe_interval_seconds,
    )


def input_file(file_path: str) -> Path:
    """The job's input file, refused unless inside the upload directory or allowed roots."""
    if not isinstance(file_path, str) or not file_path or "\x00" in file_path:
        raise InvalidInputError("file_path must be a non-empty path")
    path = ensure_inside(Path(file_path), settings.input_roots)
    if not path.is_file():
        raise InvalidInputError(
            "the input file does not exist (was it uploaded to shared "
            "storage the worker can read?)",
            details={"path": file_path},
        )
    return path
