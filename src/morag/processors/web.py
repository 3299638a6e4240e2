"""Web pages: fetch through the SSRF guard, extract the main content as Markdown, chunk it.

Only ``morag.core.url_guard.fetch`` touches the network. trafilatura receives the fetched
HTML as a string and never downloads anything: ``url=`` only labels the document.
"""

from __future__ import annotations

import re
import time
from typing import Any

import trafilatura

from morag.core.errors import InvalidInputError
from morag.core.url_guard import FetchResult, Resolver, UrlPolicy, fetch
from morag.processors.base import (
    ChunkingOptions,
    ProcessingResult,
    ProcessorLimits,
    ProgressCallback,
    no_progress,
)
from morag.processors.chunking import chunk_segments
from morag.processors.sections import first_heading, split_markdown_sections

HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain", "text/markdown", "text/x-markdown")
ACCEPTED_TYPES = HTML_TYPES + TEXT_TYPES

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


def process_web(
    url: str,
    *,
    policy: UrlPolicy,
    options: ChunkingOptions = ChunkingOptions(),  # noqa: B008 - frozen dataclass
    limits: ProcessorLimits = ProcessorLimits(),  # noqa: B008 - frozen dataclass
    progress: ProgressCallback = no_progress,
    resolver: Resolver | None = None,
) -> ProcessingResult:
    """Fetch ``url`` safely and turn its main content into Markdown and chunks."""
    progress(0.1, "fetching", f"fetching {url}")
    page = fetch(
        url,
        policy,
        timeout=limits.web_timeout_seconds,
        max_bytes=limits.web_max_bytes,
        max_redirects=limits.web_max_redirects,
        accept_content_types=ACCEPTED_TYPES,
        resolver=resolver,
    )

    progress(0.5, "extracting", f"extracting {len(page.content)} bytes")
    started = time.perf_counter()
    markdown, found = _to_markdown(page)
    extraction_ms = (time.perf_counter() - started) * 1000
    if not markdown.strip():
        raise InvalidInputError(
            f"no readable content found at {page.final_url}", details={"url": page.final_url}
        )

    progress(0.8, "chunking", "splitting into chunks")
    base = {"source": page.final_url, "url": page.final_url}
    chunks = chunk_segments(split_markdown_sections(markdown), options, base_metadata=base)

    progress(0.95, "finalising", f"{len(chunks)} chunks")
    metadata: dict[str, Any] = {
        **found,
        "final_url": page.final_url,
        "requested_url": url,
        "content_type": page.content_type,
        "fetched_bytes": len(page.content),
        "extraction_ms": round(extraction_ms, 1),
    }
    return ProcessingResult(kind="web", markdown=markdown, chunks=chunks, metadata=metadata)


def _to_markdown(page: FetchResult) -> tuple[str, dict[str, Any]]:
    """Markdown and page metadata (title, author, date, sitename) from a fetched page."""
    text = _decode(page)
    is_html = page.content_type in HTML_TYPES or (
        not page.content_type and text.lstrip()[:1] == "<"  # no Content-Type: sniff
    )
    if not is_html:
        markdown = text.strip()
        return markdown, {
            "title": first_heading(markdown),
            "author": None,
            "date": None,
            "sitename": None,
        }
    document = trafilatura.extract_with_metadata(
        text,
        url=page.final_url,
        output_format="markdown",
        include_tables=True,
        include_comments=False,
        include_formatting=True,
    )
    if document is None or not document.text:
        return "", {}
    markdown = _FRONT_MATTER.sub("", document.text, count=1).strip()  # metadata kept apart
    title = document.title or first_heading(markdown)
    if title and not _HEADING.match(markdown.split("\n", 1)[0]):
        markdown = f"# {title}\n\n{markdown}"
    found = {
        "title": title,
        "author": document.author,
        "date": document.date,
        "sitename": document.sitename,
        "description": document.description,
        "language": document.language,
    }
    return markdown, found


def _decode(page: FetchResult) -> str:
    if page.encoding:
        try:
            return page.content.decode(page.encoding, errors="replace")
        except LookupError:  # unknown charset name from the server
            pass
    if page.content_type in HTML_TYPES or not page.content_type:
        # let trafilatura detect the charset (meta tags, byte statistics)
        return trafilatura.utils.decode_file(page.content)
    return page.content.decode("utf-8", errors="replace")
