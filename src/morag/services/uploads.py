"""Uploads: a streaming ``multipart/form-data`` reader that writes files where workers read them.

Starlette's form parser spools every file to a temporary file before the endpoint runs;
this reader writes each file part straight to its final place in the upload directory as
it arrives, hashing it on the way, and stops at the size cap, so an oversized upload is
refused (and its partial file deleted) without ever being stored whole.

Stored names are generated (``<uuid><.ext>``); the client's file name is only kept,
sanitised, as metadata.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from morag.core.errors import InvalidInputError, LimitExceededError, UnsupportedFormatError

MAX_CLIENT_NAME_CHARS = 255
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,10}$")


def _private(path: str, flags: int) -> int:
    """Open an upload 0600 whatever the process's umask: it is someone's private document."""
    return os.open(path, flags, 0o600)


def safe_client_name(raw: str) -> str:
    """The client's file name without directories, control characters or NUL; may be ``""``."""
    name = unicodedata.normalize("NFC", raw or "")
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")  # controls, NUL
    name = re.split(r"[/\\]", name)[-1].strip()  # a path's last component only
    if name in (".", ".."):
        return ""
    if len(name) > MAX_CLIENT_NAME_CHARS:
        stem, ext = os.path.splitext(name)
        name = stem[: MAX_CLIENT_NAME_CHARS - len(ext[:16])] + ext[:16]
    return name


def stored_name(client_name: str) -> str:
    """A fresh server-side name keeping only a plain, short extension of the client's name."""
    ext = Path(client_name).suffix.lower()
    return uuid.uuid4().hex + (ext if _EXTENSION.match(ext) else "")


@dataclass
class StoredFile:
    """A file part written to the upload directory."""

    field: str
    path: Path
    client_name: str
    size: int = 0
    sha256: str = ""


@dataclass
class ReceivedForm:
    """Text fields (repeatable) and stored files of one multipart request."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[StoredFile] = field(default_factory=list)

    def discard(self) -> None:
        """Delete the stored files (the request was refused or was a duplicate)."""
        for stored in self.files:
            stored.path.unlink(missing_ok=True)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    data: bytearray = field(default_factory=bytearray)
    stored: StoredFile | None = None
    handle: IO[bytes] | None = None
    hasher: Any = None


class _FormReader:
    """Callbacks for python-multipart; file data is written by ``read`` outside them."""

    def __init__(
        self,
        upload_dir: Path,
        max_file_bytes: int,
        max_files: int,
        max_field_bytes: int,
        max_fields: int,
        charset: str,
    ) -> None:
        self.upload_dir = upload_dir
        self.max_file_bytes = max_file_bytes
        self.max_files = max_files
        self.max_field_bytes = max_field_bytes
        self.max_fields = max_fields
        self.charset = charset
        self.form = ReceivedForm()
        self.part = _Part()
        self.header_name = b""
        self.header_value = b""
        self.field_count = 0
        # Work for the async side: (part, bytes) to write, parts to close.
        self.to_write: list[tuple[_Part, bytes]] = []
        self.to_close: list[_Part] = []
        self.to_open: list[_Part] = []
        self.open_parts: list[_Part] = []

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.header_name.lower()] = self.header_value
        self.header_name, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        disposition = self.part.headers.get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise InvalidInputError("a multipart part has no field name")
        self.part.name = self._decode(options[b"name"])
        if b"filename" in options:
            if len(self.form.files) >= self.max_files:
                raise LimitExceededError(
                    f"too many files: at most {self.max_files} per request",
                    details={"max_files": self.max_files},
                )
            client_name = safe_client_name(self._decode(options[b"filename"]))
            path = self.upload_dir / stored_name(client_name)
            self.part.stored = StoredFile(self.part.name, path, client_name)
            self.part.hasher = hashlib.sha256()
            self.form.files.append(self.part.stored)
            self.to_open.append(self.part)
        else:
            self.field_count += 1
            if self.field_count > self.max_fields:
                raise LimitExceededError(f"too many form fields: at most {self.max_fields}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.part.stored is not None:
            self.part.stored.size += len(chunk)
            if self.part.stored.size > self.max_file_bytes:
                raise LimitExceededError(
                    f"the file {self.part.stored.client_name or self.part.name!r} is larger "
                    f"than the upload limit of {self.max_file_bytes} bytes",
                    details={"field": self.part.name, "max_bytes": self.max_file_bytes},
                )
            self.to_write.append((self.part, chunk))
        else:
            if len(self.part.data) + len(chunk) > self.max_field_bytes:
                raise LimitExceededError(
                    f"the form field {self.part.name!r} is larger than "
                    f"{self.max_field_bytes} bytes",
                    details={"field": self.part.name, "max_bytes": self.max_field_bytes},
                )
            self.part.data.extend(chunk)

    def on_part_end(self) -> None:
        if self.part.stored is not None:
            self.to_close.append(self.part)
        else:
            self.form.fields.setdefault(self.part.name, []).append(
                self._decode(bytes(self.part.data))
            )

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except UnicodeDecodeError as exc:
            raise InvalidInputError(
                f"a form field is not valid text in the request's charset ({self.charset})"
            ) from exc

    def flush(self) -> None:
        """Open, write and close what the callbacks queued (runs in a worker thread)."""
        for part in self.to_open:
            assert part.stored is not None
            part.handle = open(part.stored.path, "xb", opener=_private)  # noqa: SIM115 - closed below
            self.open_parts.append(part)
        self.to_open.clear()
        for part, chunk in self.to_write:
            assert part.handle is not None
            part.handle.write(chunk)
            part.hasher.update(chunk)
        self.to_write.clear()
        for part in self.to_close:
            assert part.handle is not None and part.stored is not None
            part.handle.close()
            part.stored.sha256 = part.hasher.hexdigest()
            self.open_parts.remove(part)
        self.to_close.clear()

    def close_all(self) -> None:
        for part in self.open_parts:
            if part.handle is not None:
                part.handle.close()
        self.open_parts.clear()


def multipart_boundary(content_type: str) -> tuple[bytes, str]:
    """The boundary and charset of a ``multipart/form-data`` content type, or a 415."""
    media_type, params = parse_options_header(content_type or "")
    if media_type != b"multipart/form-data":
        raise UnsupportedFormatError(
            "send the request as multipart/form-data",
            details={"content_type": content_type or None},
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidInputError("the multipart content type has no boundary")
    charset = params.get(b"charset", b"utf-8")
    charset_text = charset.decode("latin-1") if isinstance(charset, bytes) else str(charset)
    try:
        charset_text = codecs.lookup(charset_text).name
    except LookupError:
        charset_text = "utf-8"
    return boundary, charset_text


async def receive_form(
    content_type: str,
    stream: AsyncIterator[bytes],
    *,
    upload_dir: Path,
    max_file_bytes: int,
    max_files: int,
    max_field_bytes: int,
    max_fields: int = 64,
) -> ReceivedForm:
    """Read a multipart body, storing file parts in ``upload_dir`` as they arrive.

    Refusals are morag errors (413 over a cap, 415 not multipart, 422 malformed); on any
    failure every file stored so far is deleted.
    """
    boundary, charset = multipart_boundary(content_type)
    reader = _FormReader(
        upload_dir, max_file_bytes, max_files, max_field_bytes, max_fields, charset
    )
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": reader.on_part_begin,
            "on_part_data": reader.on_part_data,
            "on_part_end": reader.on_part_end,
            "on_header_field": reader.on_header_field,
            "on_header_value": reader.on_header_value,
            "on_header_end": reader.on_header_end,
            "on_headers_finished": reader.on_headers_finished,
        },
    )
    try:
        async for chunk in stream:
            parser.write(chunk)
            if reader.to_open or reader.to_write or reader.to_close:
                # Disk writes off the event loop: the upload directory may be shared storage.
                await anyio.to_thread.run_sync(reader.flush)
        parser.finalize()
        await anyio.to_thread.run_sync(reader.flush)
        if reader.open_parts:
            raise InvalidInputError("the multipart body ended in the middle of a file")
    except FormParserError as exc:
        reader.close_all()
        reader.form.discard()
        raise InvalidInputError(f"malformed multipart body: {exc}") from None
    except BaseException:
        reader.close_all()
        reader.form.discard()
        raise
    return reader.form
