"""Hostile input files, generated cheaply, and what morag must answer to each.

Used by the worker-level test (test_hostile_files.py: straight to the task) and the
API-level one (test_api_hostile.py: uploaded over HTTP).
"""

from __future__ import annotations

import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from tests.samples import make_pdf, make_video, make_zip_bomb


def blank_pages_pdf(path: Path, pages: int) -> Path:
    """A real PDF of ``pages`` blank pages (10,000 pages: ~1.3 MB, ~1 s to write)."""
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(612, 792)
    writer.write(str(path))
    return path


def lying_pdf(path: Path, claimed_pages: int) -> Path:
    """A well-formed one-page PDF whose page tree claims ``claimed_pages`` pages."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count %d >>" % claimed_pages,
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    path.write_bytes(bytes(out))
    return path


def truncated_pdf(path: Path) -> Path:
    data = make_pdf(path.with_suffix(".whole.pdf"), pages=4).read_bytes()
    path.with_suffix(".whole.pdf").unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def png_named_pdf(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(path, format="PNG")
    return path


def latin1_text(path: Path) -> Path:
    path.write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e: a non-UTF-8 note.\n".encode("latin-1") * 20)
    return path


def silence_wav(path: Path, seconds: int = 3) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(bytes(2 * 16000 * seconds))
    return path


def hours_of_silence_flac(path: Path, seconds: int = 3 * 3600, rate: int = 1000) -> Path:
    """Three hours of audio in a few hundred KB: FLAC at 1 kHz stores silence compactly."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=rate)
        stream.layout = "mono"
        stream.format = "s16"
        minute = np.zeros((1, rate * 60), dtype=np.int16)
        for _ in range(seconds // 60):
            frame = av.AudioFrame.from_ndarray(minute, format="s16", layout="mono")
            frame.rate = rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def video_without_audio(path: Path) -> Path:
    make_video(path, seconds=4, audio_codec=None)
    return path


@dataclass(frozen=True)
class Case:
    """A hostile file and the answer it must get.

    ``errors``: acceptable error types of a FAILURE job (empty: the job must succeed);
    ``says``: words the error message (or, for a success, the Markdown) must contain.
    """

    name: str
    filename: str
    make: Callable[[Path], Path]
    kind: str  # document | audio | video
    errors: tuple[str, ...]
    says: str
    max_seconds: float = 30.0  # from start to final state on the worker


FILE_CASES = [
    Case("empty", "empty.txt", lambda p: p.write_bytes(b"") or p, "document",
         ("InvalidInputError",), "empty"),
    Case("truncated-pdf", "cut.pdf", truncated_pdf, "document",
         ("InvalidInputError",), "damaged or truncated"),
    Case("encrypted-pdf", "locked.pdf", lambda p: make_pdf(p, pages=2, password="secret"),
         "document", ("InvalidInputError",), "encrypted"),
    Case("zip-bomb-docx", "bomb.docx", lambda p: make_zip_bomb(p, megabytes=500), "document",
         ("LimitExceededError",), "expands too much", max_seconds=10),
    Case("10000-page-pdf", "huge.pdf", lambda p: blank_pages_pdf(p, 10_000), "document",
         ("LimitExceededError",), "10000 pages", max_seconds=10),
    Case("pdf-claiming-1e9-pages", "liar.pdf", lambda p: lying_pdf(p, 10**9), "document",
         ("LimitExceededError", "InvalidInputError"), "", max_seconds=10),
    Case("image-renamed-pdf", "photo.pdf", png_named_pdf, "document",
         ("UnsupportedFormatError",), "Portable Network Graphics"),
    Case("non-utf8-text", "latin1.txt", latin1_text, "document", (), "Café crème brûlée"),
    Case("silent-audio", "silence.wav", silence_wav, "audio", (), "No speech detected"),
    Case("video-without-audio", "mute.mp4", video_without_audio, "video", (), "no audio track"),
    Case("3-hour-audio", "long.flac", hours_of_silence_flac, "audio",
         ("LimitExceededError",), "max_media_seconds", max_seconds=10),
]  # fmt: skip
