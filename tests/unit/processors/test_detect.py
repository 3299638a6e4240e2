"""Type detection from content: magic bytes first, the name only for text-like files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from morag.core.errors import InvalidInputError, UnsupportedFormatError
from morag.processors.detect import detect_type, media_kind
from tests.samples import make_docx, make_pdf, make_pptx, make_xlsx

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_office_and_pdf_files_are_known_by_content_not_name(tmp_path: Path) -> None:
    # Names are deliberately wrong: content decides.
    assert detect_type(make_pdf(tmp_path / "a.bin", pages=1)) == "pdf"
    assert detect_type(make_docx(tmp_path / "a.xlsx")) == "docx"
    assert detect_type(make_pptx(tmp_path / "a.docx")) == "pptx"
    assert detect_type(make_xlsx(tmp_path / "a.dat")) == "xlsx"


def test_text_like_formats_use_content_then_extension(tmp_path: Path) -> None:
    html = b"  <!DOCTYPE html>\n<html><body><p>hi</p></body></html>"
    assert detect_type(write(tmp_path / "page.txt", html)) == "html"
    assert detect_type(write(tmp_path / "x", b"<html lang='en'><p>x</p></html>")) == "html"
    assert detect_type(write(tmp_path / "frag.htm", b"<p>fragment</p>")) == "html"
    assert detect_type(write(tmp_path / "notes.md", b"# Title\n\ntext")) == "markdown"
    assert detect_type(write(tmp_path / "notes.txt", b"# Title\n\ntext")) == "text"
    assert detect_type(write(tmp_path / "log", b"plain words")) == "text"
    # A Markdown file that merely mentions <html> later is not HTML.
    md = b"# Embedding\n\nUse `<html>` tags.\n"
    assert detect_type(write(tmp_path / "doc.md", md)) == "markdown"


def test_declared_name_beats_the_stored_name(tmp_path: Path) -> None:
    stored = write(tmp_path / "upload-1234", b"# Heading\n\nbody")
    assert detect_type(stored, declared_name="README.md") == "markdown"
    assert detect_type(stored) == "text"


def test_non_utf8_text_is_text(tmp_path: Path) -> None:
    latin1 = "Le café était très animé, à côté du marché.\n".encode("latin-1") * 20
    assert detect_type(write(tmp_path / "fr.txt", latin1)) == "text"
    utf16 = "Grüße aus Köln\n".encode("utf-16")
    assert detect_type(write(tmp_path / "de.txt", utf16)) == "text"


def test_empty_file_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="the file is empty"):
        detect_type(write(tmp_path / "empty.pdf", b""))


def test_missing_file_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        detect_type(tmp_path / "nope.pdf")


def test_image_renamed_pdf_is_unsupported_and_named(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError) as caught:
        detect_type(write(tmp_path / "scan.pdf", PNG))
    assert "Portable Network Graphics" in caught.value.message
    assert ".pdf" in caught.value.message
    assert caught.value.details["extension"] == ".pdf"


def test_plain_zip_is_not_an_office_file(tmp_path: Path) -> None:
    path = tmp_path / "archive.docx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(UnsupportedFormatError, match="ZIP archive that is not a Word"):
        detect_type(path)


def test_opendocument_zip_names_its_type(tmp_path: Path) -> None:
    path = tmp_path / "letter.odt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mimetype", "application/vnd.oasis.opendocument.text")
        zf.writestr("content.xml", "<office:document-content/>")
    with pytest.raises(UnsupportedFormatError, match="opendocument.text"):
        detect_type(path)


def test_truncated_zip_is_invalid_not_unsupported(tmp_path: Path) -> None:
    data = make_docx(tmp_path / "full.docx").read_bytes()
    path = write(tmp_path / "cut.docx", data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="damaged or truncated") as caught:
        detect_type(path)
    assert not isinstance(caught.value, UnsupportedFormatError)


def test_binary_blob_and_legacy_office_are_unsupported(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 8
    with pytest.raises(UnsupportedFormatError, match="unrecognised binary data"):
        detect_type(write(tmp_path / "blob.docx", blob))
    ole2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)
    with pytest.raises(UnsupportedFormatError, match="legacy"):
        detect_type(write(tmp_path / "old.doc", ole2))


def test_text_named_as_a_binary_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError, match="named .pdf but contains plain text"):
        detect_type(write(tmp_path / "fake.pdf", b"just some words"))


def test_media_file_sent_as_document_gets_a_hint(tmp_path: Path) -> None:
    mp4 = b"\x00\x00\x00\x18ftypmp42" + bytes(200)
    with pytest.raises(UnsupportedFormatError, match="submit video as video"):
        detect_type(write(tmp_path / "clip.pdf", mp4))


def test_media_kind(tmp_path: Path) -> None:
    cases = {
        "a.mp4": (b"\x00\x00\x00\x18ftypisom" + bytes(100), "video"),
        "b.m4a": (b"\x00\x00\x00\x18ftypM4A " + bytes(100), "audio"),
        "c.mp3": (b"ID3\x03\x00\x00\x00" + bytes(100), "audio"),
        "d.wav": (b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(100), "audio"),
        "e.webm": (b"\x1a\x45\xdf\xa3" + bytes(100), "video"),
        "f.png": (PNG, None),
        "g.txt": (b"hello there", None),
        "h.mp3": (b"", None),
    }
    for name, (data, kind) in cases.items():
        assert media_kind(write(tmp_path / name, data)) == kind, name
