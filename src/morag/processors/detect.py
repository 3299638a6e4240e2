"""What a file is, judged from its content rather than its name.

Binary formats are recognised by their bytes (``%PDF``, a ZIP container's Office parts);
the file name only decides between text-like formats (Markdown, HTML, plain text).
"""

from __future__ import annotations

import codecs
import zipfile
from pathlib import Path

import puremagic

from morag.core.errors import InvalidInputError, UnsupportedFormatError

DOCUMENT_FORMATS = ("pdf", "docx", "pptx", "xlsx", "html", "markdown", "text")

_HEAD_BYTES = 8192
_MARKDOWN_EXTS = {".md", ".markdown", ".mdown", ".mkd", ".mkdn"}
_HTML_EXTS = {".html", ".htm", ".xhtml"}
_BINARY_DOC_EXTS = {".pdf", ".docx", ".pptx", ".xlsx"}
_OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_OFFICE_PARTS = (("word/", "docx"), ("ppt/", "pptx"), ("xl/", "xlsx"))
_BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
# Text may hold tabs, newlines, form feeds, backspace and escape; other controls mean binary.
_TEXT_CONTROLS = {8, 9, 10, 12, 13, 27}

_AUDIO_EXTS = {
    ".mp3", ".wav", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma", ".aiff", ".aif",
}  # fmt: skip
_VIDEO_EXTS = {
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg", ".mpeg", ".3gp",
}  # fmt: skip
# ISO base media brands that mean sound only; any other brand is treated as video.
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}


def detect_type(path: Path, declared_name: str | None = None) -> str:
    """Return the document format of ``path``: one of ``DOCUMENT_FORMATS``.

    ``declared_name`` is the client's file name (uploads are stored under other names);
    its extension only separates Markdown, HTML and plain text.
    """
    head = _read_head(path)
    ext = Path(declared_name or path.name).suffix.lower()

    if b"%PDF-" in head[:1024]:  # readers accept the header anywhere in the first KB
        return "pdf"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _office_format(path)
    if head.startswith(_OLE2_MAGIC):
        raise UnsupportedFormatError(
            "found a legacy or password-protected Microsoft Office file (.doc, .xls, .ppt); "
            "save it as an unprotected .docx, .xlsx or .pptx",
            details={"found": "ole2"},
        )
    if _looks_like_text(head):
        if _sniff_html(head):
            return "html"
        if ext in _BINARY_DOC_EXTS:
            raise UnsupportedFormatError(
                f"the file is named {ext} but contains plain text, not a {ext[1:].upper()} file",
                details={"found": "text", "extension": ext},
            )
        if ext in _HTML_EXTS:
            return "html"
        return "markdown" if ext in _MARKDOWN_EXTS else "text"

    found = _describe(head)
    named = f" (named {ext})" if ext else ""
    kind = media_kind(path)
    hint = (
        f"; submit {kind} as {kind}, not as a document"
        if kind
        else "; documents must be PDF, Word, PowerPoint, Excel, HTML, Markdown or text"
    )
    raise UnsupportedFormatError(
        f"unsupported file type: found {found}{named}{hint}",
        details={"found": found, "extension": ext, "media_kind": kind},
    )


def media_kind(path: Path) -> str | None:
    """``"audio"`` or ``"video"`` when the content is a media file, else ``None``."""
    try:
        head = _read_head(path)
    except InvalidInputError:
        return None
    if head[4:8] == b"ftyp":  # MP4 family: the brand tells sound-only files apart
        return "audio" if head[8:12] in _AUDIO_BRANDS else "video"
    try:
        matches = puremagic.magic_string(head)
    except (puremagic.PureError, ValueError):
        return None
    for match in matches:
        mime, ext, name = match.mime_type or "", match.extension.lower(), match.name.lower()
        if mime.startswith("audio/") or ext in _AUDIO_EXTS:
            return "audio"
        if mime.startswith("video/") or ext in _VIDEO_EXTS or "matroska" in name:
            return "video"
    return None


def _read_head(path: Path) -> bytes:
    try:
        with Path(path).open("rb") as file:
            head = file.read(_HEAD_BYTES)
    except FileNotFoundError as exc:
        raise InvalidInputError("the input file does not exist") from exc
    except IsADirectoryError as exc:
        raise InvalidInputError("the input is a directory, not a file") from exc
    if not head:
        raise InvalidInputError("the file is empty")
    return head


def _office_format(path: Path) -> str:
    """Tell a Word, PowerPoint or Excel file from any other ZIP, reading only its directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            mimetype = _small_entry(archive, "mimetype")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise InvalidInputError(
            f"the file is a damaged or truncated ZIP/Office container: {exc}"
        ) from exc
    if "[Content_Types].xml" in names:
        for prefix, fmt in _OFFICE_PARTS:
            if any(name.startswith(prefix) for name in names):
                return fmt
    what = f"a ZIP archive of type {mimetype}" if mimetype else "a ZIP archive"
    raise UnsupportedFormatError(
        f"found {what} that is not a Word, PowerPoint or Excel file",
        details={"found": "zip", "zip_mimetype": mimetype},
    )


def _small_entry(archive: zipfile.ZipFile, name: str) -> str:
    """The text of a tiny entry such as ODF/EPUB's ``mimetype``, or ``""``."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        return ""
    if info.file_size > 200:
        return ""
    return archive.read(info).decode("ascii", errors="replace").strip()


def _looks_like_text(head: bytes) -> bool:
    if head.startswith(_BOMS):
        return True
    if b"\x00" in head:
        return False
    controls = sum(1 for byte in head if byte < 32 and byte not in _TEXT_CONTROLS)
    if controls > len(head) // 100:
        return False
    try:
        # Incremental: a multi-byte character cut by the head's end is not an error.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        return True
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    return from_bytes(head).best() is not None


def _sniff_html(head: bytes) -> bool:
    for bom in _BOMS:
        if head.startswith(bom):
            text = head[len(bom) :].decode(
                "utf-8" if bom == codecs.BOM_UTF8 else "utf-16", errors="ignore"
            )
            break
    else:
        text = head.decode("latin-1")
    start = text[:1024].lstrip().lower()
    return start.startswith("<") and ("<!doctype html" in start or "<html" in start)


def _describe(head: bytes) -> str:
    """Name what a rejected file looks like, for the error message."""
    try:
        best = puremagic.magic_string(head)[0]
    except (puremagic.PureError, ValueError, IndexError):
        return "unrecognised binary data"
    suffix = f" ({best.extension})" if best.extension else ""
    return f"{best.name.strip() or 'binary data'}{suffix}"
