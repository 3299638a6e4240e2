"""Document fixtures, generated in each test's tmp_path (nothing is checked in)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

PAGE_TEXT = "Page {n} talks about subject {n} and nothing else."


def make_pdf(path: Path, pages: int = 3, *, password: str | None = None) -> Path:
    """A PDF whose page n holds PAGE_TEXT for n (and a second paragraph)."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for n in range(1, pages + 1):
        pdf.add_page()
        pdf.multi_cell(0, 10, PAGE_TEXT.format(n=n), new_x="LMARGIN", new_y="NEXT")
        pdf.multi_cell(0, 10, f"Second paragraph of page {n}.", new_x="LMARGIN", new_y="NEXT")
    pdf.set_title("Fixture PDF")
    pdf.set_author("Ada Tester")
    if password is not None:
        pdf.set_encryption(owner_password="owner", user_password=password)
    pdf.output(str(path))
    return path


def make_docx(path: Path) -> Path:
    from docx import Document

    doc = Document()
    doc.add_heading("Quarterly Report", level=1)
    doc.add_paragraph("The quarter went well overall.")
    doc.add_heading("Revenue", level=2)
    doc.add_paragraph("Revenue grew in every region.")
    table = doc.add_table(rows=3, cols=2)
    for row, (region, amount) in enumerate([("Region", "Amount"), ("North", "10"), ("South", "7")]):
        table.cell(row, 0).text = region
        table.cell(row, 1).text = amount
    doc.add_heading("Outlook", level=2)
    doc.add_paragraph("Next quarter looks stable.")
    doc.save(str(path))
    return path


def make_pptx(path: Path, slides: int = 3) -> Path:
    from pptx import Presentation

    deck = Presentation()
    for n in range(1, slides + 1):
        slide = deck.slides.add_slide(deck.slide_layouts[1])
        slide.shapes.title.text = f"Slide title {n}"
        slide.placeholders[1].text = f"Bullet about topic {n}"
    deck.save(str(path))
    return path


def make_xlsx(path: Path) -> Path:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "Sales"
    sheet.append(["Product", "Units"])
    sheet.append(["Widget", 12])
    sheet.append(["Gadget", 5])
    other = book.create_sheet("Staff")
    other.append(["Name", "Team"])
    other.append(["Grace", "Ops"])
    book.save(str(path))
    return path


def make_zip_bomb(path: Path, *, office: bool = True, megabytes: int = 50) -> Path:
    """A small file that expands to ``megabytes`` of zeros; looks like a .docx if ``office``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        if office:
            zf.writestr("[Content_Types].xml", "<Types/>")
        zf.writestr("word/document.xml" if office else "zeros.bin", bytes(megabytes << 20))
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def pdf_file(tmp_path: Path) -> Path:
    return make_pdf(tmp_path / "report.pdf", pages=3)


@pytest.fixture
def docx_file(tmp_path: Path) -> Path:
    return make_docx(tmp_path / "report.docx")


@pytest.fixture
def pptx_file(tmp_path: Path) -> Path:
    return make_pptx(tmp_path / "deck.pptx")


@pytest.fixture
def xlsx_file(tmp_path: Path) -> Path:
    return make_xlsx(tmp_path / "book.xlsx")
