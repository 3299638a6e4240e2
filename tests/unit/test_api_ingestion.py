"""Submission checks of the ingestion service, key comparison and body limits: pure logic
(nothing here talks to Redis; building the service opens no connection)."""

from __future__ import annotations

from pathlib import Path

import pytest

from morag.api.main import body_limit
from morag.core.config import Settings
from morag.core.errors import (
    ForbiddenTargetError,
    InvalidInputError,
    LimitExceededError,
    UnsupportedFormatError,
)
from morag.services.ingestion import SubmissionChecks, normalise_url
from morag.services.uploads import StoredFile


@pytest.fixture
def service(tmp_path: Path) -> SubmissionChecks:
    cfg = Settings(
        _env_file=None,
        data_dir=tmp_path,
        max_metadata_bytes=100,
        chunk_size_tokens=256,
        chunk_overlap_tokens=32,
        ssrf_allow=[],
    )
    return SubmissionChecks(cfg)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("HTTPS://Example.COM:443/a?q=1#frag", "https://example.com/a?q=1"),
        ("http://example.com:80", "http://example.com/"),
        ("https://example.com", "https://example.com/"),
    ],
)
def test_equivalent_urls_normalise_alike(a: str, b: str) -> None:
    assert normalise_url(a) == normalise_url(b)


def test_different_urls_stay_different() -> None:
    assert normalise_url("https://example.com:8443/") != normalise_url("https://example.com/")
    assert normalise_url("https://example.com/a?x=1") != normalise_url("https://example.com/a")


def test_options_get_server_defaults_and_are_checked(service: SubmissionChecks) -> None:
    assert service.check_options(None) == {
        "chunk_size_tokens": 256,
        "chunk_overlap_tokens": 32,
        "index": True,
    }
    assert service.check_options({"chunk_size_tokens": 64, "chunk_overlap_tokens": None}) == {
        "chunk_size_tokens": 64,
        "chunk_overlap_tokens": 32,
        "index": True,
    }
    assert service.check_options({"index": False})["index"] is False
    with pytest.raises(InvalidInputError, match="smaller than chunk_size_tokens") as raised:
        service.check_options({"chunk_size_tokens": 32})  # default overlap 32 is too big
    assert raised.value.details["field"] == "options.chunk_overlap_tokens"


def test_metadata_must_be_a_small_json_object(service: SubmissionChecks) -> None:
    assert service.parse_metadata(None) == {} and service.parse_metadata("  ") == {}
    assert service.parse_metadata('{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        service.parse_metadata("{oops")
    with pytest.raises(InvalidInputError, match="JSON object"):
        service.parse_metadata('"text"')
    with pytest.raises(LimitExceededError) as raised:
        service.check_metadata({"x": "y" * 200})
    assert raised.value.details["max_bytes"] == 100


def test_url_submissions(service: SubmissionChecks) -> None:
    spec = service.prepare_url(
        "https://example.com/a#x", metadata={"k": 1}, webhook_url="https://hooks.example.com/in"
    )
    assert spec.kind == "web" and spec.kwargs["url"] == "https://example.com/a"
    assert spec.kwargs["options"] == {
        "chunk_size_tokens": 256,
        "chunk_overlap_tokens": 32,
        "index": True,
    }
    assert spec.webhook_url == "https://hooks.example.com/in"
    same_work = service.prepare_url(
        "HTTPS://EXAMPLE.com:443/a",
        metadata={"other": True},
        webhook_url="https://hooks.example.com/in",
    )
    assert same_work.content_key == spec.content_key  # metadata is not part of the work
    assert same_work.request_key != spec.request_key  # but it is part of the request
    other_options = service.prepare_url(
        "https://example.com/a",
        options={"chunk_size_tokens": 512},
        webhook_url="https://hooks.example.com/in",
    )
    assert other_options.content_key != spec.content_key

    with pytest.raises(ForbiddenTargetError) as raised:
        service.prepare_url("http://127.0.0.1/admin", field_prefix="items.3.")
    assert raised.value.details["field"] == "items.3.url"
    assert raised.value.message.startswith("items.3.url: ")
    with pytest.raises(ForbiddenTargetError) as raised:
        service.prepare_url("https://example.com/", webhook_url="http://[::1]:9/hook")
    assert raised.value.details["field"] == "webhook_url"
    # Media URLs go to the media tasks, which download them; the same URL as a web page
    # is different work.
    video = service.prepare_url("https://example.com/a.mp4", source_type="video")
    assert video.kind == "video"
    assert video.kwargs == {
        "url": "https://example.com/a.mp4",
        "metadata": {},
        "options": video.kwargs["options"],
    }
    as_page = service.prepare_url("https://example.com/a.mp4")
    assert as_page.kind == "web" and as_page.content_key != video.content_key
    with pytest.raises(ForbiddenTargetError):
        service.prepare_url("http://10.0.0.1/a.mp3", source_type="audio")


def _stored(tmp_path: Path, content: bytes, name: str) -> StoredFile:
    path = tmp_path / f"stored-{name}"
    path.write_bytes(content)
    return StoredFile("file", path, name, len(content), "0" * 64)


def test_file_kinds_come_from_the_bytes(service: SubmissionChecks, tmp_path: Path) -> None:
    text = _stored(tmp_path, b"# Title\n\nbody\n", "a.md")
    spec = service.prepare_file(text, metadata={"filename": "spoofed", "k": 1})
    assert spec.kind == "document" and spec.kwargs["source_type"] == "document"
    assert spec.kwargs["metadata"] == {"filename": "a.md", "k": 1}
    assert spec.kwargs["file_path"] == str(text.path)

    wav = _stored(tmp_path, b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 64, "x.bin")
    assert service.prepare_file(wav).kind == "audio"
    assert service.prepare_file(wav, source_type="audio").kind == "audio"
    with pytest.raises(UnsupportedFormatError, match="audio"):
        service.prepare_file(wav, source_type="document")
    with pytest.raises(UnsupportedFormatError, match="not an audio or video file"):
        service.prepare_file(text, source_type="video")
    with pytest.raises(UnsupportedFormatError):
        service.prepare_file(_stored(tmp_path, b"\x00\x01\x02\x03" * 20, "blob"))
    with pytest.raises(InvalidInputError, match="empty"):
        service.prepare_file(StoredFile("file", tmp_path / "none", "e.md", 0, ""))


def test_body_limits_depend_on_endpoint_and_content_type() -> None:
    cfg = Settings(_env_file=None, max_upload_bytes=1000, max_metadata_bytes=100, batch_max_items=3)
    single = body_limit(cfg, "/api/v1/ingest/file", "multipart/form-data; boundary=x")
    batch = body_limit(cfg, "/api/v1/ingest/batch", "multipart/form-data; boundary=x")
    json_body = body_limit(cfg, "/api/v1/ingest/url", "application/json")
    assert 1000 < single < 1000 + 100_000 and batch == 3 * single
    assert json_body >= 1024 * 1024
