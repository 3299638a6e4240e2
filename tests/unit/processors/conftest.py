"""Document fixtures, generated in each test's tmp_path (nothing is checked in)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.samples import (
    make_docx,
    make_pdf,
    make_pptx,
    make_xlsx,
)


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
