"""The document processor on generated files: content, metadata, limits and bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from morag.core.errors import (
    InvalidInputError,
    JobCancelledError,
    LimitExceededError,
    UnsupportedFormatError,
)
from morag.processors.base import ChunkingOptions, ProcessorLimits
from morag.processors.chunking import count_tokens
from morag.processors.document import decode_text, process_document
from tests.samples import PAGE_TEXT, make_pdf, make_zip_bomb


class Recorder:
    """A progress callback that remembers its calls and may cancel at call ``cancel_at``."""

    def __init__(self, cancel_at: int | None = None) -> None:
        self.calls: list[tuple[float, str, str]] = []
        self.cancel_at = cancel_at

    def __call__(self, fraction: float, stage: str, message: str = "") -> None:
        self.calls.append((fraction, stage, message))
        if len(self.calls) == self.cancel_at:
            raise JobCancelledError("cancelled by the test")


def test_pdf_pages_reach_markdown_chunks_and_metadata(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "manual.pdf", pages=5)
    progress = Recorder()
    result = process_document(pdf, progress=progress, options=ChunkingOptions(32, 0))

    assert result.kind == "document"
    for n in range(1, 6):
        assert PAGE_TEXT.format(n=n) in result.markdown
    meta = result.metadata
    assert meta["format"] == "pdf"
    assert meta["page_count"] == 5
    assert meta["title"] == "Fixture PDF"
    assert meta["author"] == "Ada Tester"
    assert meta["size_bytes"] == pdf.stat().st_size
    # Each page's own text is found in a chunk that says it comes from that page.
    for n in range(1, 6):
        holders = [c for c in result.chunks if PAGE_TEXT.format(n=n) in c.text]
        assert holders and all(n in c.metadata["pages"] for c in holders)
    assert all(c.tokens <= 32 for c in result.chunks)
    assert result.chunks[0].metadata["page"] == 1
    assert result.chunks[-1].metadata["pages"][-1] == 5


def test_progress_is_monotonic_with_a_call_per_pdf_page(tmp_path: Path) -> None:
    progress = Recorder()
    process_document(make_pdf(tmp_path / "p.pdf", pages=4), progress=progress)

    fractions = [f for f, _, _ in progress.calls]
    assert fractions == sorted(fractions)
    assert fractions[0] > 0 and fractions[-1] < 1
    stages = [s for _, s, _ in progress.calls]
    assert stages[0] == "validating"
    assert stages.count("converting") == 1 + 4  # start + once per page
    assert stages[-2:] == ["chunking", "finalising"]


@pytest.mark.parametrize("cancel_at", [2, 4])
def test_cancellation_from_progress_propagates(tmp_path: Path, cancel_at: int) -> None:
    progress = Recorder(cancel_at=cancel_at)
    with pytest.raises(JobCancelledError):
        process_document(make_pdf(tmp_path / "p.pdf", pages=4), progress=progress)
    assert len(progress.calls) == cancel_at  # nothing ran after the cancel


def test_docx_keeps_headings_and_tables(docx_file: Path) -> None:
    result = process_document(docx_file)

    assert "# Quarterly Report" in result.markdown
    assert "## Revenue" in result.markdown
    assert "| North | 10 |" in result.markdown
    assert result.metadata["format"] == "docx"
    assert result.metadata["title"] == "Quarterly Report"
    paths = [c.metadata.get("heading_path") for c in result.chunks]
    assert ["Quarterly Report", "Revenue"] in paths
    table_chunk = next(c for c in result.chunks if "| South | 7 |" in c.text)
    assert table_chunk.metadata["heading_path"] == ["Quarterly Report", "Revenue"]


def test_docx_keeps_lists_and_underline(tmp_path: Path) -> None:
    from docx import Document

    doc = Document()
    doc.add_heading("Steps", level=1)
    doc.add_paragraph("first step", style="List Bullet")
    doc.add_paragraph("second step", style="List Bullet")
    doc.add_paragraph("one", style="List Number")
    doc.add_paragraph("two", style="List Number")
    doc.add_paragraph().add_run("mind this").underline = True
    doc.save(str(tmp_path / "steps.docx"))

    result = process_document(tmp_path / "steps.docx")

    assert "* first step\n* second step" in result.markdown
    assert "1. one\n2. two" in result.markdown
    assert "mind this" in result.markdown
    assert result.metadata["converter"] == "mammoth"


def test_pptx_is_segmented_by_slide(pptx_file: Path) -> None:
    result = process_document(pptx_file, options=ChunkingOptions(16, 0))

    assert result.metadata["slide_count"] == 3
    assert result.metadata["title"] == "Slide title 1"
    for n in (1, 2, 3):
        holder = next(c for c in result.chunks if f"Bullet about topic {n}" in c.text)
        assert n in holder.metadata["slides"]
    assert "<!-- Slide number" not in "".join(c.text for c in result.chunks)


def test_xlsx_becomes_one_table_per_sheet(xlsx_file: Path) -> None:
    result = process_document(xlsx_file)

    assert "| Widget | 12 |" in result.markdown
    assert "| Grace | Ops |" in result.markdown
    assert result.metadata["sheets"] == ["Sales", "Staff"]
    sheets = {c.metadata["sheet"] for c in result.chunks}
    assert sheets == {"Sales", "Staff"}


def test_html_title_and_structure_without_scripts(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text(
        "<!doctype html><html><head><title>Queue Guide</title>"
        "<script>alert('x')</script><style>p{}</style></head>"
        "<body><h1>Queues</h1><p>Workers pull jobs.</p>"
        "<h2>Retries</h2><ul><li>backoff</li><li>limits</li></ul></body></html>",
        encoding="utf-8",
    )
    result = process_document(page)

    assert result.metadata["title"] == "Queue Guide"
    assert "# Queues" in result.markdown and "alert" not in result.markdown
    assert any(c.metadata.get("heading_path") == ["Queues", "Retries"] for c in result.chunks)


def test_html_with_declared_legacy_charset(tmp_path: Path) -> None:
    page = tmp_path / "old.html"
    page.write_bytes(
        b'<html><head><meta charset="windows-1252"><title>Caf\xe9</title></head>'
        b"<body><p>Cr\xe8me br\xfbl\xe9e \x96 d\xe9licieuse.</p></body></html>"
    )
    result = process_document(page)
    assert result.metadata["title"] == "Café"
    assert "Crème brûlée – délicieuse." in result.markdown


def test_markdown_sections_carry_their_heading_path(tmp_path: Path) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text(
        "Intro before any heading.\n\n"
        "# Guide\n## Install\nRun the installer.\n\n"
        "```bash\n# not a heading\n```\n"
        "## Use\n### Advanced\nTune it.\n"
        "# Appendix\nNotes.\n",
        encoding="utf-8",
    )
    result = process_document(doc)

    assert result.metadata["format"] == "markdown"
    assert result.metadata["title"] == "Guide"
    by_path = {tuple(c.metadata.get("heading_path", [])): c.text for c in result.chunks}
    assert by_path[()] == "Intro before any heading."
    assert "# not a heading" in by_path[("Guide", "Install")]
    assert by_path[("Guide", "Use", "Advanced")].startswith("## Use\n\n### Advanced")
    assert by_path[("Appendix",)] == "# Appendix\nNotes."


def test_latin1_text_is_decoded(tmp_path: Path) -> None:
    sentence = "Le café était très animé, à côté du marché où l'on vendait des pâtés.\n"
    doc = tmp_path / "notes.txt"
    doc.write_bytes(sentence.encode("latin-1") * 10)
    result = process_document(doc)

    assert result.metadata["format"] == "text"
    assert "Le café était très animé" in result.markdown
    assert "\ufffd" not in result.markdown


def test_decode_text_never_raises() -> None:
    assert decode_text("grüß".encode())[0] == "grüß"
    assert decode_text("\ufeffbom".encode())[0] == "bom"
    text, _ = decode_text(b"\xff\xfe\x00broken \x81\x8d\x8f\x90\x9d")
    assert isinstance(text, str)


def test_long_text_is_chunked_within_bounds(tmp_path: Path) -> None:
    doc = tmp_path / "long.txt"
    doc.write_text("\n\n".join(f"Paragraph {i} says something useful." for i in range(300)))
    result = process_document(doc, options=ChunkingOptions(64, 8))
    assert len(result.chunks) > 5
    assert all(c.tokens == count_tokens(c.text) <= 64 for c in result.chunks)
    assert all(c.metadata["source"] == "long.txt" for c in result.chunks)


# --- bad inputs ------------------------------------------------------------------------


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.docx").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="the file is empty"):
        process_document(tmp_path / "empty.docx")


def test_whitespace_only_text_has_no_text(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text(" \n\n\t \n")
    with pytest.raises(InvalidInputError, match="contains no text"):
        process_document(tmp_path / "blank.txt")


def test_truncated_pdf(tmp_path: Path) -> None:
    data = make_pdf(tmp_path / "whole.pdf", pages=4).read_bytes()
    cut = tmp_path / "cut.pdf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="PDF is damaged or truncated"):
        process_document(cut)


def test_encrypted_pdf(tmp_path: Path) -> None:
    locked = make_pdf(tmp_path / "locked.pdf", pages=2, password="secret")
    with pytest.raises(InvalidInputError, match="the PDF is encrypted"):
        process_document(locked)


def test_pdf_with_empty_user_password_is_readable(tmp_path: Path) -> None:
    restricted = make_pdf(tmp_path / "restricted.pdf", pages=2, password="")
    result = process_document(restricted)
    assert PAGE_TEXT.format(n=2) in result.markdown


def test_image_renamed_pdf(tmp_path: Path) -> None:
    fake = tmp_path / "photo.pdf"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(100))
    with pytest.raises(UnsupportedFormatError, match="Portable Network Graphics"):
        process_document(fake)


def test_zip_bomb_disguised_as_docx(tmp_path: Path) -> None:
    bomb = make_zip_bomb(tmp_path / "bomb.docx", megabytes=50)
    assert bomb.stat().st_size < 200_000  # small on disk
    with pytest.raises(LimitExceededError, match="the archive expands too much"):
        process_document(bomb)


def test_expanded_size_is_bounded_by_the_size_limit(tmp_path: Path, docx_file: Path) -> None:
    # A real docx (which expands ~25x) passes with a limit equal to its own size...
    limits = ProcessorLimits(max_bytes=docx_file.stat().st_size)
    process_document(docx_file, limits=limits)
    # ...but a file of that size may not expand past 100x the limit, even below the
    # 10 MB floor of the ratio rule.
    bomb = make_zip_bomb(tmp_path / "b.docx", megabytes=5)
    assert bomb.stat().st_size <= limits.max_bytes
    with pytest.raises(LimitExceededError, match="expands too much"):
        process_document(bomb, limits=limits)


def test_page_limit(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "long.pdf", pages=4)
    with pytest.raises(LimitExceededError, match="4 pages; the limit is 3") as caught:
        process_document(pdf, limits=ProcessorLimits(max_pages=3))
    assert caught.value.details["page_count"] == 4
    process_document(pdf, limits=ProcessorLimits(max_pages=4))


def test_size_limit(tmp_path: Path) -> None:
    doc = tmp_path / "big.txt"
    doc.write_text("word " * 1000)
    with pytest.raises(LimitExceededError, match="the limit is 4000 bytes"):
        process_document(doc, limits=ProcessorLimits(max_bytes=4000))


def test_converter_failures_become_clear_invalid_input(tmp_path: Path, docx_file: Path) -> None:
    # A valid ZIP with Word's parts, but the main part is not XML at all.
    import zipfile

    broken = tmp_path / "broken.docx"
    with zipfile.ZipFile(docx_file) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = b"not xml" if item.filename == "word/document.xml" else src.read(item)
            dst.writestr(item, data)
    with pytest.raises(InvalidInputError, match="could not read the Word file: ") as caught:
        process_document(broken)
    assert not isinstance(caught.value, UnsupportedFormatError)


def test_one_unreadable_pdf_page_does_not_lose_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pypdf import PageObject

    original = PageObject.extract_text
    calls = {"n": 0}

    def flaky(self: PageObject, *args: object, **kwargs: object) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("bad content stream")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PageObject, "extract_text", flaky)
    result = process_document(make_pdf(tmp_path / "p.pdf", pages=3))
    assert result.metadata["unreadable_pages"] == [2]
    assert PAGE_TEXT.format(n=3) in result.markdown
    assert PAGE_TEXT.format(n=2) not in result.markdown


def test_time_limit_exceptions_are_not_disguised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pypdf import PageObject

    class SoftTimeLimitExceeded(Exception):  # the name Celery's exception has
        pass

    def slow(self: PageObject, *args: object, **kwargs: object) -> str:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(PageObject, "extract_text", slow)
    with pytest.raises(SoftTimeLimitExceeded):
        process_document(make_pdf(tmp_path / "p.pdf", pages=2))
