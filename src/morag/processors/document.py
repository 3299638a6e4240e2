"""Documents (PDF, Word, PowerPoint, Excel, HTML, Markdown, text) to Markdown and chunks.

PDF goes through pypdf page by page (pages are kept in chunk metadata). Office files and
HTML go through markitdown's converters, called directly so that no plugin, network
session, LLM or external tool is ever involved. Markdown output is cut into sections at
headings (processors/sections.py) so chunks carry their ``heading_path``.
"""

from __future__ import annotations

import codecs
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from morag.core.errors import InvalidInputError, LimitExceededError, MoragError
from morag.processors.base import (
    ChunkingOptions,
    ProcessingResult,
    ProcessorLimits,
    ProgressCallback,
    TextSegment,
    no_progress,
)
from morag.processors.chunking import chunk_segments
from morag.processors.detect import detect_type
from morag.processors.sections import split_markdown_sections

FORMAT_LABELS = {
    "pdf": "PDF",
    "docx": "Word",
    "pptx": "PowerPoint",
    "xlsx": "Excel",
    "html": "HTML",
    "markdown": "Markdown",
    "text": "text",
}
_OFFICE_FORMATS = {"docx", "pptx", "xlsx"}
_HEADED_FORMATS = {"docx", "html", "markdown"}  # whose first heading is a fair title

# ZIP bomb bounds for Office files. Real documents expand 2-20x; the ratio only counts
# above a floor because tiny XML parts compress extremely well.
ZIP_MAX_EXPANDED_BYTES = 500 * 1024 * 1024
ZIP_MAX_EXPANSION_OF_LIMIT = 100  # and at most 100x limits.max_bytes (docx: ~25x seen)
ZIP_MAX_ENTRIES = 10_000
ZIP_MAX_RATIO = 100
ZIP_RATIO_FLOOR_BYTES = 10 * 1024 * 1024
# mammoth parses XML into a DOM tens of times its size: bound each XML part.
ZIP_MAX_XML_PART_BYTES = 100 * 1024 * 1024

_DOCX_UNDERLINE_STYLE = "u => u"  # keep underlines, as markitdown does
_WESTERN_ENCODINGS = ("cp1252", "iso8859_1", "iso8859_15")
_SLIDE_MARKER = re.compile(r"^<!-- Slide number: (\d+) -->$", re.MULTILINE)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", re.IGNORECASE)
# Exceptions Celery raises inside a task on its time limits: never disguise them as bad input.
_PASS_THROUGH_NAMES = {"SoftTimeLimitExceeded", "TimeLimitExceeded", "Terminated"}


@dataclass
class _Converted:
    markdown: str
    segments: list[TextSegment]
    metadata: dict[str, Any] = field(default_factory=dict)


_Converter = Callable[[Path, ProcessorLimits, ProgressCallback], _Converted]


def process_document(
    path: Path,
    *,
    options: ChunkingOptions = ChunkingOptions(),  # noqa: B008 - frozen, safe as default
    limits: ProcessorLimits = ProcessorLimits(),  # noqa: B008 - frozen, safe as default
    progress: ProgressCallback = no_progress,
    declared_name: str | None = None,
) -> ProcessingResult:
    """Convert the document at ``path`` to Markdown and chunks.

    Raises ``InvalidInputError`` kinds for bad files (empty, corrupt, encrypted, too big,
    unsupported) and lets ``JobCancelledError`` from ``progress`` propagate.
    """
    path = Path(path)
    name = declared_name or path.name
    progress(0.05, "validating", "checking the file")
    size = _file_size(path)
    if size > limits.max_bytes:
        raise LimitExceededError(
            f"the file is {size} bytes; the limit is {limits.max_bytes} bytes",
            details={"size_bytes": size, "max_bytes": limits.max_bytes},
        )
    fmt = detect_type(path, declared_name)
    label = FORMAT_LABELS[fmt]
    if fmt in _OFFICE_FORMATS:
        check_zip_expansion(path, limits)

    progress(0.1, "converting", f"reading the {label} file")
    try:
        converted = _CONVERTERS[fmt](path, limits, progress)
    except MoragError:
        raise  # our own errors, JobCancelledError included, are already clear
    except Exception as exc:
        if _must_propagate(exc):
            raise
        reason = str(exc).strip() or type(exc).__name__
        raise InvalidInputError(
            f"could not read the {label} file: {reason[:300]}", details={"format": fmt}
        ) from exc
    if not converted.markdown.strip():
        raise InvalidInputError(f"the {label} file contains no text", details={"format": fmt})

    progress(0.85, "chunking", "splitting into chunks")
    chunks = chunk_segments(converted.segments, options, {"source": name})

    progress(0.95, "finalising", f"{len(chunks)} chunks")
    metadata: dict[str, Any] = {
        "format": fmt,
        "source_name": name,
        "size_bytes": size,
        **converted.metadata,
    }
    if not metadata.get("title"):
        heading = _first_heading(converted.segments) if fmt in _HEADED_FORMATS else None
        metadata["title"] = heading or Path(name).stem
    return ProcessingResult(
        kind="document", markdown=converted.markdown, chunks=chunks, metadata=metadata
    )


def check_zip_expansion(path: Path, limits: ProcessorLimits) -> None:
    """Refuse a ZIP container that would expand too much (a ZIP bomb).

    Reads only the central directory. Declared sizes can be trusted as an upper bound:
    Python's zipfile stops reading an entry at its declared size.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidInputError(f"the ZIP/Office container is damaged: {exc}") from exc
    if len(entries) > ZIP_MAX_ENTRIES:
        raise LimitExceededError(
            f"the archive has {len(entries)} entries; the limit is {ZIP_MAX_ENTRIES}",
            details={"entries": len(entries)},
        )
    expanded = sum(e.file_size for e in entries)
    packed = sum(e.compress_size for e in entries)
    cap = min(ZIP_MAX_EXPANDED_BYTES, ZIP_MAX_EXPANSION_OF_LIMIT * limits.max_bytes)
    bomb_entry = any(
        e.file_size > ZIP_RATIO_FLOOR_BYTES
        and e.file_size > ZIP_MAX_RATIO * max(e.compress_size, 1)
        for e in entries
    )
    bomb_total = expanded > ZIP_RATIO_FLOOR_BYTES and expanded > ZIP_MAX_RATIO * max(packed, 1)
    huge_xml = any(
        e.filename.endswith((".xml", ".rels")) and e.file_size > ZIP_MAX_XML_PART_BYTES
        for e in entries
    )
    if expanded > cap or bomb_entry or bomb_total or huge_xml:
        raise LimitExceededError(
            "the archive expands too much",
            details={"expanded_bytes": expanded, "packed_bytes": packed, "max_bytes": cap},
        )


def decode_text(data: bytes) -> tuple[str, str]:
    """Decode bytes of unknown encoding; return ``(text, encoding)``. Never raises."""
    for bom, encoding in (
        (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF32_LE, "utf-32"),
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            return data.decode(encoding, errors="replace"), encoding
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    matches = from_bytes(data)
    best = matches.best()
    # Detection is weak on short Western text (French can come out as mac_latin2):
    # prefer Windows-1252, by far the commonest legacy encoding, when it is about as clean.
    western = next((m for m in matches if m.encoding in _WESTERN_ENCODINGS), None)
    if best is not None and western is not None and western.chaos <= best.chaos + 0.1:
        best = western
    if best is not None:
        return str(best), best.encoding
    return data.decode("utf-8", errors="replace"), "utf-8"


# --- converters -----------------------------------------------------------------------


def _convert_pdf(path: Path, limits: ProcessorLimits, progress: ProgressCallback) -> _Converted:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(path)
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InvalidInputError(
            f"the PDF is damaged or truncated and cannot be read: {exc}", details={"format": "pdf"}
        ) from exc
    if reader.is_encrypted and not _unlock(reader):
        raise InvalidInputError("the PDF is encrypted", details={"format": "pdf"})

    page_count = len(reader.pages)
    if page_count > limits.max_pages:
        raise LimitExceededError(
            f"the PDF has {page_count} pages; the limit is {limits.max_pages}",
            details={"page_count": page_count, "max_pages": limits.max_pages},
        )
    if page_count == 0:
        raise InvalidInputError("the PDF has no pages", details={"format": "pdf"})

    segments: list[TextSegment] = []
    parts: list[str] = []
    unreadable: list[int] = []
    for number, page in enumerate(reader.pages, start=1):
        try:
            text = _tidy(page.extract_text() or "")
        except Exception as exc:  # one broken page should not lose the whole document
            if _must_propagate(exc):
                raise
            unreadable.append(number)
            text = ""
        if text:
            segments.append(TextSegment(text, {"page": number}))
            parts.append(f"<!-- page {number} -->\n\n{text}")
        # Outside the try: a cancellation raised here must propagate.
        progress(0.1 + 0.7 * number / page_count, "converting", f"page {number} of {page_count}")

    if not segments:
        detail = "its pages could not be read" if unreadable else "it may be scanned images"
        raise InvalidInputError(
            f"the PDF contains no extractable text ({detail}; OCR is not supported)",
            details={"format": "pdf", "page_count": page_count},
        )
    metadata: dict[str, Any] = {"page_count": page_count, "converter": "pypdf"}
    metadata.update(_pdf_info(reader))
    if unreadable:
        metadata["unreadable_pages"] = unreadable
    return _Converted("\n\n".join(parts), segments, metadata)


def _unlock(reader: Any) -> bool:
    """Open a PDF encrypted with an empty user password (restrictions only)."""
    from pypdf import PasswordType

    try:
        return reader.decrypt("") != PasswordType.NOT_DECRYPTED
    except Exception:  # e.g. AES without a crypto library: treat as locked
        return False


def _pdf_info(reader: Any) -> dict[str, Any]:
    try:
        info = reader.metadata
        found = {"title": info.title, "author": info.author} if info else {}
    except Exception:  # malformed info dictionaries are common and harmless
        return {}
    return {k: str(v).strip() for k, v in found.items() if v and str(v).strip()}


def _markitdown(converter_name: str, extension: str, path: Path) -> Any:
    """Run one markitdown converter on a local file, with no plugins or network."""
    import markitdown.converters as converters
    from markitdown import StreamInfo

    converter = getattr(converters, converter_name)()
    with path.open("rb") as stream:
        return converter.convert(stream, StreamInfo(extension=extension, local_path=str(path)))


def _convert_docx(path: Path, limits: ProcessorLimits, progress: ProgressCallback) -> _Converted:
    """Word to HTML with mammoth, then to Markdown with markitdown's HTML converter.

    markitdown's own DocxConverter first rewrites the document's XML through BeautifulSoup
    (to turn equations into LaTeX), and with lxml >= 6.2 that rewrite drops the ``w:``
    namespace prefixes, leaving mammoth no body to read. Calling mammoth on the original
    file keeps headings, lists and tables with any lxml; equations are left out.
    """
    import mammoth
    from markitdown.converters import HtmlConverter

    with path.open("rb") as stream:
        embedded_style_map = mammoth.read_embedded_style_map(stream)
        stream.seek(0)
        style_map = "\n".join(filter(None, [embedded_style_map, _DOCX_UNDERLINE_STYLE]))
        html = mammoth.convert_to_html(
            stream, style_map=style_map, include_embedded_style_map=False
        ).value
    markdown = _tidy(HtmlConverter().convert_string(html).markdown)
    return _Converted(markdown, split_markdown_sections(markdown), {"converter": "mammoth"})


def _convert_pptx(path: Path, limits: ProcessorLimits, progress: ProgressCallback) -> _Converted:
    markdown = _tidy(_markitdown("PptxConverter", ".pptx", path).markdown)
    first_title = re.search(r"^# (.+)$", markdown, re.MULTILINE)
    segments: list[TextSegment] = []
    markers = list(_SLIDE_MARKER.finditer(markdown))
    for marker, following in zip(markers, [*markers[1:], None], strict=True):
        end = following.start() if following else len(markdown)
        text = markdown[marker.end() : end].strip()
        if text:
            segments.append(TextSegment(text, {"slide": int(marker.group(1))}))
    metadata: dict[str, Any] = {"slide_count": len(markers), "converter": "markitdown"}
    if first_title:
        metadata["title"] = first_title.group(1).strip()
    return _Converted(markdown, segments, metadata)


def _convert_xlsx(path: Path, limits: ProcessorLimits, progress: ProgressCallback) -> _Converted:
    markdown = _tidy(_markitdown("XlsxConverter", ".xlsx", path).markdown)
    segments = split_markdown_sections(markdown)  # markitdown writes "## <sheet>" per sheet
    for segment in segments:
        path_ = segment.metadata.get("heading_path")
        if path_:
            segment.metadata["sheet"] = path_[0]
    sheets = [s.metadata["sheet"] for s in segments if "sheet" in s.metadata]
    return _Converted(markdown, segments, {"sheets": sheets, "converter": "markitdown"})


def _convert_html(path: Path, limits: ProcessorLimits, progress: ProgressCallback) -> _Converted:
    """The page's main content (processors/html_content.py) to Markdown with markitdown."""
    from markitdown.converters import HtmlConverter

    from morag.processors.html_content import page_content

    data = path.read_bytes()
    declared = _META_CHARSET.search(data[:4096])
    text, encoding = _decode_declared(data, declared.group(1).decode() if declared else None)
    page = page_content(text)
    markdown = _tidy(HtmlConverter().convert_string(page.html).markdown)
    metadata: dict[str, Any] = {
        "encoding": encoding,
        "converter": "markitdown",
        "html_content": page.kept,
    }
    if page.title and page.title.strip():
        metadata["title"] = page.title.strip()
    return _Converted(markdown, split_markdown_sections(markdown), metadata)


def _convert_markdown(
    path: Path, limits: ProcessorLimits, progress: ProgressCallback
) -> _Converted:
    text, encoding = decode_text(path.read_bytes())
    markdown = _tidy(text)
    return _Converted(markdown, split_markdown_sections(markdown), {"encoding": encoding})


def _convert_text(path: Path, limits: ProcessorLimits, progress: ProgressCallback) -> _Converted:
    text, encoding = decode_text(path.read_bytes())
    text = _tidy(text)
    return _Converted(text, [TextSegment(text)], {"encoding": encoding})


_CONVERTERS: dict[str, _Converter] = {
    "pdf": _convert_pdf,
    "docx": _convert_docx,
    "pptx": _convert_pptx,
    "xlsx": _convert_xlsx,
    "html": _convert_html,
    "markdown": _convert_markdown,
    "text": _convert_text,
}


# --- helpers --------------------------------------------------------------------------


def _must_propagate(exc: BaseException) -> bool:
    """True for Celery's time-limit exceptions (matched by name: no Celery import here)."""
    return type(exc).__name__ in _PASS_THROUGH_NAMES


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError as exc:
        raise InvalidInputError("the input file does not exist") from exc


def _decode_declared(data: bytes, encoding: str | None) -> tuple[str, str]:
    if encoding:
        try:
            return data.decode(encoding), encoding.lower()
        except (LookupError, UnicodeDecodeError):
            pass  # a wrong <meta charset> is common: fall back to detection
    return decode_text(data)


def _tidy(text: str) -> str:
    """Drop NULs and trailing spaces, and collapse runs of blank lines."""
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _first_heading(segments: list[TextSegment]) -> str | None:
    for segment in segments:
        path = segment.metadata.get("heading_path")
        if path:
            return str(path[0])
    return None
