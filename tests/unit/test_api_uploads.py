"""The streaming multipart reader and upload names (no Redis, no HTTP: bytes in, files out)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from morag.core.errors import InvalidInputError, LimitExceededError, UnsupportedFormatError
from morag.services.uploads import ReceivedForm, receive_form, safe_client_name, stored_name

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (
        f'; filename="{filename}"' if filename is not None else ""
    )
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


async def chunks(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):  # small pieces: boundaries split across chunks
        yield data[start : start + size]


def receive(
    data: bytes, tmp_path: Path, content_type: str = CONTENT_TYPE, **limits: int
) -> ReceivedForm:
    options = {"max_file_bytes": 1000, "max_files": 2, "max_field_bytes": 100, **limits}
    return asyncio.run(
        receive_form(content_type, chunks(data), upload_dir=tmp_path, **options)  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("notes.md", "notes.md"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\me\\report.PDF", "report.PDF"),
        ("a\x00b\x1f.txt", "ab.txt"),
        ("evil\u202etxt.exe", "eviltxt.exe"),  # right-to-left override dropped
        ("..", ""),
        ("dir/", ""),
        ("", ""),
    ],
)
def test_client_names_lose_paths_and_control_characters(sent: str, kept: str) -> None:
    assert safe_client_name(sent) == kept


def test_long_client_names_keep_their_extension() -> None:
    name = safe_client_name("x" * 400 + ".docx")
    assert len(name) == 255 and name.endswith(".docx")


def test_stored_names_are_fresh_and_keep_only_plain_extensions() -> None:
    first, second = stored_name("a.MD"), stored_name("a.MD")
    assert first != second and first.endswith(".md") and len(first) == 32 + 3
    assert "." not in stored_name("archive.tar.gz;rm -rf")
    assert "." not in stored_name("noext") and "." not in stored_name(".hidden")


def test_fields_and_files_are_read_and_hashed(tmp_path: Path) -> None:
    content = b"# Title\n\n" + b"words " * 100
    form = receive(
        body(
            part("metadata", b'{"a": 1}'),
            part("file", content, "../n.md"),
            part("tag", b"x"),
            part("tag", b"y"),
        ),
        tmp_path,
    )
    assert form.fields == {"metadata": ['{"a": 1}'], "tag": ["x", "y"]}
    (stored,) = form.files
    assert stored.field == "file" and stored.client_name == "n.md"
    assert stored.path.parent == tmp_path and stored.path.read_bytes() == content
    assert stored.size == len(content) and stored.sha256 == hashlib.sha256(content).hexdigest()
    form.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_file_over_the_cap_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    data = body(part("file", b"a" * 200, "ok.txt"), part("file", b"b" * 1001, "big.txt"))
    with pytest.raises(LimitExceededError, match="big.txt") as raised:
        receive(data, tmp_path)
    assert raised.value.details["max_bytes"] == 1000
    assert list(tmp_path.iterdir()) == []


def test_limits_on_files_and_fields(tmp_path: Path) -> None:
    three = body(*(part("file", b"x", f"{i}.txt") for i in range(3)))
    with pytest.raises(LimitExceededError, match="at most 2"):
        receive(three, tmp_path)
    with pytest.raises(LimitExceededError, match="metadata"):
        receive(body(part("metadata", b"m" * 101)), tmp_path)
    with pytest.raises(LimitExceededError, match="form fields"):
        receive(body(*(part(f"f{i}", b"v") for i in range(5))), tmp_path, max_fields=4)
    assert list(tmp_path.iterdir()) == []


def test_not_multipart_or_malformed(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFormatError):
        receive(b"{}", tmp_path, content_type="application/json")
    with pytest.raises(InvalidInputError, match="boundary"):
        receive(b"x", tmp_path, content_type="multipart/form-data")
    with pytest.raises(InvalidInputError, match="field name"):
        receive(
            body(f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nx\r\n".encode()), tmp_path
        )
    truncated = part("file", b"half a file", "cut.txt")[:-2]  # no closing boundary
    with pytest.raises(InvalidInputError):
        receive(truncated, tmp_path)
    assert list(tmp_path.iterdir()) == []
