"""The common shape of every processor: plain Python, no Celery, no FastAPI.

A processor takes an input (a file path or a URL), options, and a progress callback,
and returns a ``ProcessingResult``. The callback may raise ``JobCancelledError`` when
the job was cancelled: processors call it between stages and inside long loops and let
that error propagate. Errors a user should see are ``morag.core.errors`` kinds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol


class ProgressCallback(Protocol):
    def __call__(self, fraction: float, stage: str, message: str = "") -> None:
        """Report progress in 0..1 of the whole job, the current stage, and a short message."""


def no_progress(fraction: float, stage: str, message: str = "") -> None:
    """A progress callback that ignores everything (CLI use, tests)."""


@dataclass(frozen=True)
class ChunkingOptions:
    chunk_tokens: int = 512
    overlap_tokens: int = 64

    def __post_init__(self) -> None:
        if self.chunk_tokens < 16:
            raise ValueError("chunk_tokens must be at least 16")
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise ValueError("overlap_tokens must be >= 0 and smaller than chunk_tokens")


@dataclass
class TextSegment:
    """A piece of source text with what is known of its place (page, heading, time)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Chunk:
    text: str
    index: int
    tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Artifact:
    """A file produced by a job (a keyframe), stored under the artifact directory."""

    name: str
    path: str  # relative to the artifact directory
    media_type: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProcessingResult:
    kind: str  # document | audio | video | web
    markdown: str
    chunks: list[Chunk] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    document_id: str | None = None  # set once the chunks are in the index

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """What a status read shows without loading the whole result."""
        return {
            "kind": self.kind,
            "markdown_chars": len(self.markdown),
            "chunk_count": len(self.chunks),
            "artifact_count": len(self.artifacts),
            "title": self.metadata.get("title"),
            "document_id": self.document_id,
        }


@dataclass(frozen=True)
class ProcessorLimits:
    """Limits a processor enforces; built from settings by the task layer."""

    max_bytes: int = 200 * 1024 * 1024
    max_pages: int = 2000
    max_media_seconds: float = 2 * 3600
    web_timeout_seconds: float = 20.0
    web_max_redirects: int = 5
    web_max_bytes: int = 10 * 1024 * 1024
    max_keyframes: int = 20
    keyframe_interval_seconds: float = 10.0


def ensure_inside(path: Path, roots: list[Path]) -> Path:
    """Resolve ``path`` and refuse it unless it lies inside one of ``roots``."""
    from morag.core.errors import ForbiddenTargetError

    resolved = Path(path).resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).resolve()):
            return resolved
    raise ForbiddenTargetError(
        "input file is outside the upload directory and allowed roots",
        details={"path": str(path)},
    )
