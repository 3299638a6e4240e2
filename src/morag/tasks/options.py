"""Processor arguments built from settings and a job's options (validated here)."""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from morag.core.config import settings
from morag.core.errors import InvalidInputError, UnsupportedFormatError
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


#: Media types a media URL may answer with (a response without a Content-Type passes too;
#: the downloaded bytes are checked either way).
MEDIA_CONTENT_TYPES: tuple[str, ...] = (
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/vnd.wave",
    "audio/mpeg",
    "audio/mp3",
    "audio/mp4",
    "audio/x-m4a",
    "audio/m4a",
    "audio/aac",
    "audio/flac",
    "audio/x-flac",
    "audio/ogg",
    "audio/opus",
    "audio/webm",
    "video/mp4",
    "video/quicktime",
    "video/x-matroska",
    "video/webm",
    "video/x-msvideo",
    "video/avi",
    "video/ogg",
    "video/mpeg",
    "application/ogg",
    "application/octet-stream",
)
#: Seconds a media download may take in all (at least the web page timeout).
MEDIA_DOWNLOAD_SECONDS = 300.0
_EXTENSIONS = {
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/wave": ".wav",
    "audio/vnd.wave": ".wav",
    "audio/mpeg": ".mp3",
    "audio/mp3": ".mp3",
    "audio/mp4": ".m4a",
    "audio/x-m4a": ".m4a",
    "audio/m4a": ".m4a",
    "audio/flac": ".flac",
    "audio/x-flac": ".flac",
    "audio/ogg": ".ogg",
    "video/mp4": ".mp4",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "video/webm": ".webm",
    "video/x-msvideo": ".avi",
}
_SAFE_SUFFIX = re.compile(r"\.[a-z0-9]{1,8}")


def _suffix(content_type: str, url: str) -> str:
    """A file name extension from the media type, else from the URL's path; only
    ``.[a-z0-9]{1,8}``, else ``.bin``."""
    candidates = [_EXTENSIONS.get(content_type)]
    if content_type and content_type != "application/octet-stream":
        candidates.append(mimetypes.guess_extension(content_type, strict=False))
    candidates.append(Path(urlsplit(url).path).suffix.lower())
    for suffix in candidates:
        if suffix and _SAFE_SUFFIX.fullmatch(suffix):
            return suffix
    return ".bin"


def check_one_input(file_path: str, url: str) -> None:
    """A media job names exactly one of ``file_path`` and ``url``."""
    if bool(file_path) == bool(url):
        raise InvalidInputError(
            "give exactly one of file_path and url",
            details={"file_path": bool(file_path), "url": bool(url)},
        )


def download_input(url: str, task_id: str, on_path: Callable[[Path], object] | None = None) -> Path:
    """Fetch a media URL through the SSRF guard into the upload directory as
    ``<task id>.<ext>`` and return its path; refused unless the bytes are audio or video.
    ``on_path`` hears the path before anything is written there (the job records it as
    its own, so it is deleted when the job ends, even if this process dies mid-write).

    Transient failures (timeouts, connection errors, 5xx) raise ``TransientError``, which
    the task layer retries; a retry downloads again over the same name.
    """
    from morag.core.url_guard import UrlPolicy, fetch
    from morag.processors.detect import media_kind

    if not isinstance(url, str) or not url or "\x00" in url:
        raise InvalidInputError("url must be a non-empty string")
    if not task_id or not re.fullmatch(r"[A-Za-z0-9_-]{1,128}", task_id):
        raise InvalidInputError("a download needs the job's id", details={"task_id": task_id})
    upload_dir = settings.upload_dir
    assert upload_dir is not None
    fetched = fetch(
        url,
        UrlPolicy.from_settings(settings),
        timeout=max(MEDIA_DOWNLOAD_SECONDS, settings.web_timeout_seconds),
        max_bytes=settings.max_upload_bytes,
        max_redirects=settings.web_max_redirects,
        accept_content_types=MEDIA_CONTENT_TYPES,
    )
    if not fetched.content:
        raise InvalidInputError(f"{url} answered an empty body", details={"url": url})
    upload_dir.mkdir(parents=True, exist_ok=True)
    path = upload_dir / f"{task_id}{_suffix(fetched.content_type, fetched.final_url)}"
    if on_path is not None:
        on_path(path)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(fetched.content)
    partial.replace(path)
    if media_kind(path) is None:
        path.unlink(missing_ok=True)
        raise UnsupportedFormatError(
            f"{url} is not an audio or video file"
            + (f" (it answered {fetched.content_type})" if fetched.content_type else ""),
            details={"url": url, "content_type": fetched.content_type},
        )
    return path


def _owned_by(task: Any) -> Callable[[Path], object] | None:
    """Records a file the job makes as the job's own input (deleted when it ends)."""
    if task.request.called_directly:
        return None
    from morag.services.jobs import get_job_store

    return lambda path: get_job_store(settings).own_file(task.request.id, str(path))


def media_input(task: Any, file_path: str, url: str) -> Path:
    """An audio or video job's input file: the upload, or the URL downloaded first."""
    task.update_progress(0.01, "checking the input", stage="validating")
    check_one_input(file_path, url)
    if url:
        task.update_progress(0.02, "downloading the media", stage="downloading")
        file_path = str(download_input(url, task.request.id, _owned_by(task)))
    return input_file(file_path)
