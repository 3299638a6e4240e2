"""Checking submissions: what a request asks for, checked and turned into a ``JobSpec``.

Pure: no Redis, no Celery. Content types come from the bytes, URLs and webhook targets go
through the SSRF guard (without DNS), metadata and options are held to their limits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from morag.core.errors import (
    InvalidInputError,
    LimitExceededError,
    MoragError,
    UnsupportedFormatError,
)
from morag.core.url_guard import UrlPolicy, validate_url
from morag.processors.base import ChunkingOptions
from morag.services.uploads import StoredFile

if TYPE_CHECKING:
    from morag.core.config import Settings

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass
class JobSpec:
    """A checked submission, ready to publish."""

    kind: str  # document | audio | video | web
    kwargs: dict[str, Any]
    webhook_url: str | None
    content_key: str  # what makes two submissions the same work (dedupe)
    request_key: str  # what makes two requests the same request (idempotency)
    upload: StoredFile | None = None  # deleted when the request turns out a repeat
    retry_input: str = ""  # a retry's own name for the failed job's uploaded file

    @property
    def owned_file(self) -> str:
        """The stored input this job owns (deleted when it ends), if any."""
        return str(self.upload.path) if self.upload is not None else self.retry_input

    def discard_upload(self) -> None:
        """Delete the uploaded file: the request was a repeat, or was never published."""
        if self.upload is not None:
            self.upload.path.unlink(missing_ok=True)


def digest(value: Any) -> str:
    """A stable fingerprint of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def normalise_url(url: str) -> str:
    """The form two URLs for the same resource share: lower-case scheme and host, no
    default port, no fragment, ``/`` for an empty path."""
    parsed = httpx.URL(url)
    if parsed.port == _DEFAULT_PORTS.get(parsed.scheme):
        parsed = parsed.copy_with(port=None)
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{parsed.raw_path.decode('ascii')}"


class SubmissionChecks:
    """Turns what a client sent into ``JobSpec``s, or refuses it with a clear error."""

    def __init__(self, cfg: Settings) -> None:
        self.settings = cfg
        self.policy = UrlPolicy.from_settings(cfg)

    def check_metadata(self, metadata: Any, field_name: str = "metadata") -> dict[str, Any]:
        """A JSON object within ``max_metadata_bytes``."""
        if metadata is None:
            return {}
        if not isinstance(metadata, dict):
            raise InvalidInputError(
                f"{field_name} must be a JSON object", details={"field": field_name}
            )
        size = len(json.dumps(metadata, ensure_ascii=False).encode())
        if size > self.settings.max_metadata_bytes:
            raise LimitExceededError(
                f"{field_name} is {size} bytes as JSON; the limit is "
                f"{self.settings.max_metadata_bytes} bytes",
                details={
                    "field": field_name,
                    "size_bytes": size,
                    "max_bytes": self.settings.max_metadata_bytes,
                },
            )
        return metadata

    def parse_metadata(self, text: str | None, field_name: str = "metadata") -> dict[str, Any]:
        """Metadata sent as a JSON string (multipart forms)."""
        if text is None or not text.strip():
            return {}
        if len(text.encode()) > self.settings.max_metadata_bytes:
            raise LimitExceededError(
                f"{field_name} is larger than {self.settings.max_metadata_bytes} bytes",
                details={"field": field_name, "max_bytes": self.settings.max_metadata_bytes},
            )
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InvalidInputError(
                f"{field_name} is not valid JSON: {exc}", details={"field": field_name}
            ) from None
        return self.check_metadata(value, field_name)

    def check_options(
        self, options: dict[str, Any] | None, field_name: str = "options"
    ) -> dict[str, Any]:
        """Chunking and indexing options with the server's defaults filled in (what the
        job will use)."""
        given = {k: v for k, v in (options or {}).items() if v is not None}
        effective: dict[str, Any] = {
            "chunk_size_tokens": int(
                given.get("chunk_size_tokens", self.settings.chunk_size_tokens)
            ),
            "chunk_overlap_tokens": int(
                given.get("chunk_overlap_tokens", self.settings.chunk_overlap_tokens)
            ),
        }
        try:
            ChunkingOptions(
                chunk_tokens=effective["chunk_size_tokens"],
                overlap_tokens=effective["chunk_overlap_tokens"],
            )
        except ValueError as exc:
            raise InvalidInputError(
                f"invalid chunking options: chunk_overlap_tokens "
                f"({effective['chunk_overlap_tokens']}) must be smaller than "
                f"chunk_size_tokens ({effective['chunk_size_tokens']})",
                details={"field": f"{field_name}.chunk_overlap_tokens", "reason": str(exc)},
            ) from None
        effective["index"] = bool(given.get("index", self.settings.index_by_default))
        return effective

    def check_webhook(self, url: str | None, field_name: str = "webhook_url") -> str | None:
        """An http(s) target that passes the SSRF guard's checks (delivery re-checks it)."""
        if url is None or not url.strip():
            return None
        return self._check_url(url, field_name)

    def _check_url(self, url: str, field_name: str) -> str:
        try:
            return validate_url(url, self.policy)
        except MoragError as exc:
            exc.message = f"{field_name}: {exc.message}"
            exc.details = {"field": field_name, **exc.details}
            raise

    def check_batch_size(self, count: int) -> None:
        if count > self.settings.batch_max_items:
            raise LimitExceededError(
                f"a batch holds at most {self.settings.batch_max_items} items; got {count}",
                details={
                    "field": "items",
                    "max_items": self.settings.batch_max_items,
                    "items": count,
                },
            )

    def prepare_url(
        self,
        url: str,
        *,
        source_type: str = "web",
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        options: dict[str, Any] | None = None,
        field_prefix: str = "",
    ) -> JobSpec:
        """Check a URL submission: a web page (``web``), or media the worker downloads and
        processes like an upload (``audio``, ``video``)."""
        checked = self._check_url(url, f"{field_prefix}url")
        if source_type not in ("web", "audio", "video"):
            raise InvalidInputError(
                f"source_type must be web, audio or video, not {source_type!r}",
                details={"field": f"{field_prefix}source_type", "source_type": source_type},
            )
        meta = self.check_metadata(metadata, f"{field_prefix}metadata")
        hook = self.check_webhook(webhook_url, f"{field_prefix}webhook_url")
        opts = self.check_options(options, f"{field_prefix}options")
        return JobSpec(
            kind=source_type,
            kwargs={"url": checked, "metadata": meta, "options": opts},
            webhook_url=hook,
            content_key=digest(
                {
                    "url": normalise_url(checked),
                    "source_type": source_type,
                    "options": opts,
                    "webhook_url": hook,
                }
            ),
            request_key=digest(
                {
                    "url": checked,
                    "source_type": source_type,
                    "metadata": meta,
                    "webhook_url": hook,
                    "options": opts,
                }
            ),
        )

    def prepare_file(
        self,
        stored: StoredFile,
        *,
        source_type: str | None = None,
        metadata: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> JobSpec:
        """Check an uploaded file: not empty, a type morag processes (from its bytes)."""
        if stored.size == 0:
            raise InvalidInputError(
                f"the uploaded file {stored.client_name or stored.field!r} is empty",
                details={"field": stored.field},
            )
        kind = detect_kind(stored, source_type)
        meta = dict(self.check_metadata(metadata))
        if stored.client_name:
            meta["filename"] = stored.client_name  # the worker tells text from Markdown by it
        hook = self.check_webhook(webhook_url)
        opts = self.check_options(options)
        kwargs: dict[str, Any] = {"file_path": str(stored.path), "metadata": meta, "options": opts}
        if kind == "document":
            kwargs["source_type"] = "document"
        return JobSpec(
            kind=kind,
            kwargs=kwargs,
            webhook_url=hook,
            content_key=digest(
                {"sha256": stored.sha256, "source_type": kind, "options": opts, "webhook_url": hook}
            ),
            request_key=digest(
                {
                    "sha256": stored.sha256,
                    "name": stored.client_name,
                    "source_type": source_type,
                    "metadata": meta,
                    "webhook_url": hook,
                    "options": opts,
                }
            ),
            upload=stored,
        )


def detect_kind(stored: StoredFile, declared: str | None) -> str:
    """document, audio or video, from the file's bytes; 415 when morag cannot process it
    or the bytes contradict the declared type."""
    from morag.processors.detect import detect_type, media_kind

    if declared in ("audio", "video"):
        if media_kind(stored.path) is None:
            raise UnsupportedFormatError(
                f"source_type is {declared} but the file is not an audio or video file",
                details={"field": "source_type", "declared": declared},
            )
        return declared
    try:
        detect_type(stored.path, stored.client_name or None)
    except UnsupportedFormatError as exc:
        # detect_type recognises media files and says so; undeclared, they are media.
        found = exc.details.get("media_kind")
        if declared is None and found in ("audio", "video"):
            return str(found)
        raise
    return "document"
