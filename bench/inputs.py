"""Inputs generated for the run: small mixed documents, multi-page PDFs, a video, a page
server on 127.0.0.1. The binary generators are the tests' own (``tests/samples.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.infra import ROOT

SPEECH = ROOT / "tests" / "fixtures" / "speech.wav"
KINDS = ("md", "txt", "html", "pdf", "docx")


def _paragraphs(i: int, count: int = 6) -> list[str]:
    return [
        f"Paragraph {p} of document {i} explains how the ingestion service turns files into "
        f"chunks; it keeps headings, lists and tables, and records where each chunk came from."
        for p in range(1, count + 1)
    ]


def make_markdown(path: Path, i: int) -> Path:
    body = "\n\n".join(_paragraphs(i))
    path.write_text(
        f"# Document {i}\n\n{body}\n\n## Details\n\n- one\n- two\n\n"
        f"| key | value |\n| --- | --- |\n| id | {i} |\n\n## Summary\n\n{body}\n"
    )
    return path


def make_text(path: Path, i: int) -> Path:
    path.write_text(f"Document {i}\n\n" + "\n\n".join(_paragraphs(i, 10)) + "\n")
    return path


def make_html(path: Path, i: int) -> Path:
    paras = "".join(f"<p>{p}</p>" for p in _paragraphs(i))
    path.write_text(
        f"<!doctype html><html><head><title>Page {i}</title></head><body>"
        f"<h1>Page {i}</h1>{paras}<h2>Table</h2><table><tr><th>key</th><th>value</th></tr>"
        f"<tr><td>id</td><td>{i}</td></tr></table><ul><li>one</li><li>two</li></ul>"
        f"</body></html>"
    )
    return path


def make_docx(path: Path, i: int) -> Path:
    """A Word file with headings, paragraphs and a table (python-docx's default template)."""
    from docx import Document

    doc = Document()
    doc.add_heading(f"Report {i}", level=1)
    for paragraph in _paragraphs(i, 3):
        doc.add_paragraph(paragraph)
    doc.add_heading("Figures", level=2)
    table = doc.add_table(rows=3, cols=2)
    for row, (key, value) in enumerate([("key", "value"), ("id", str(i)), ("kind", "docx")]):
        table.cell(row, 0).text = key
        table.cell(row, 1).text = value
    doc.save(str(path))
    return path


def make_small_pdf(path: Path, i: int, pages: int = 2) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title(f"Paper {i}")
    pdf.set_font("helvetica", size=11)
    for n in range(1, pages + 1):
        pdf.add_page()
        for paragraph in _paragraphs(i * 100 + n, 3):
            pdf.multi_cell(0, 6, paragraph, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))
    return path


def make_documents(directory: Path, count: int = 100) -> list[Path]:
    """``count`` small documents, the five kinds in turn (md, txt, html, pdf, docx), each
    with content of its own (identical uploads would be deduplicated by the API)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        path = directory / f"doc-{i:03d}.{kind}"
        if kind == "md":
            make_markdown(path, i)
        elif kind == "txt":
            make_text(path, i)
        elif kind == "html":
            make_html(path, i)
        elif kind == "pdf":
            make_small_pdf(path, i)
        else:
            make_docx(path, i)
        paths.append(path)
    return paths


def make_book_pdf(path: Path, pages: int, seed: int = 0) -> Path:
    """A PDF of ``pages`` full pages of text (a heading and ~2,500 characters each)."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_title(path.stem)
    for n in range(1, pages + 1):
        pdf.add_page()
        pdf.set_font("helvetica", "B", size=14)
        pdf.multi_cell(0, 8, f"Chapter {n}", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("helvetica", size=10)
        for paragraph in _paragraphs(seed * 1000 + n, 10):
            pdf.multi_cell(0, 5, paragraph, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))
    return path


def make_pdfs(directory: Path, count: int, pages: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [make_book_pdf(directory / f"book-{i:02d}.pdf", pages, i) for i in range(count)]


SPEECH_TEXT = (
    "Welcome to the weekly engineering update. This week the team finished the ingestion "
    "service, which turns documents, recordings and web pages into searchable text. Every "
    "job now reports its progress, and a cancelled job stops within a second. We measured "
    "the queue against plain Celery on a small machine with two processors. The results "
    "are written to a table, next to a baseline taken in the same run, so that a slow "
    "afternoon does not hide a real regression. Next week we will look at memory use of "
    "the workers, at the speech model, and at how long a batch of one hundred documents "
    "takes from upload to the last chunk. Questions and ideas are welcome, as always. "
    "Thank you for listening, and see you at the next meeting on Thursday morning."
)


def make_long_speech(path: Path) -> Path | None:
    """About a minute of varied synthetic speech, if ``espeak-ng`` is installed."""
    import subprocess

    if not shutil.which("espeak-ng"):
        return None
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), SPEECH_TEXT],
        check=True,
        capture_output=True,
    )
    return path


def copy_speech(directory: Path) -> Path:
    target = directory / "speech.wav"
    shutil.copy(SPEECH, target)
    return target


def make_video(path: Path) -> Path:
    from tests.samples import make_video as generate

    generate(path, seconds=6.0)
    return path


PAGE = (
    "<!doctype html><html><head><title>Bench page</title>"
    '<meta name="author" content="Bench"></head><body><article><h1>Bench page</h1>'
    + "".join(f"<p>{p}</p>" for p in _paragraphs(0, 12))
    + "</article></body></html>"
).encode()


class PageServer:
    """An HTML page served on 127.0.0.1 (the web processor's input)."""

    def __init__(self) -> None:
        from tests.harness import serve_page

        self._serving = serve_page(PAGE)
        self._base = self._serving.__enter__()

    @property
    def url(self) -> str:
        return f"{self._base}/article"

    def close(self) -> None:
        self._serving.__exit__(None, None, None)
