"""Sample inputs generated on demand (nothing binary is checked in but tests/fixtures/speech.wav).

Shared by the processor, integration, e2e and reliability tests and the benchmarks.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import av
import numpy as np

SPEECH = Path(__file__).parent / "fixtures" / "speech.wav"
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 40)]

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


def colour_at(seconds: float, change_every: float) -> tuple[int, int, int]:
    return COLOURS[int(seconds // change_every) % len(COLOURS)]


def make_video(
    path: Path | io.RawIOBase,
    *,
    seconds: float = 8.0,
    fps: int = 10,
    size: tuple[int, int] = (160, 120),
    codec: str = "libx264",
    codec_options: dict[str, str] | None = None,
    audio_codec: str | None = "aac",
    audio_rate: int = 16000,
    change_every: float = 2.0,
    container_format: str | None = None,
) -> Path | io.RawIOBase:
    """Solid colours changing every ``change_every`` s (a moving square keeps frames
    distinct), plus the speech fixture as the audio track unless ``audio_codec`` is None."""
    width, height = size
    target = str(path) if isinstance(path, Path) else path
    with av.open(target, "w", format=container_format) as out:
        # Every stream must exist before the first packet is muxed.
        video = out.add_stream(codec, rate=fps, options=codec_options or {})
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream(audio_codec, rate=audio_rate, layout="mono") if audio_codec else None
        for i in range(int(seconds * fps)):
            image = np.empty((height, width, 3), np.uint8)
            image[:] = colour_at(i / fps, change_every)
            x = (i * 3) % (width - 8)
            image[height // 4 : height // 4 + 8, x : x + 8] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        if audio is not None:
            resampler = av.AudioResampler(format=audio.format.name, layout="mono", rate=audio_rate)
            with av.open(str(SPEECH)) as speech:
                for frame in [*speech.decode(audio=0), None]:
                    if frame is not None:
                        frame.pts = None
                    for converted in resampler.resample(frame):
                        out.mux(audio.encode(converted))
            out.mux(audio.encode(None))
    return path
