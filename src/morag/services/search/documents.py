"""What makes an ingested input a document: its id, its content key and its source name.

A document is one input of one owner. Its **content key** is what makes two inputs the
same: ``sha256:<hex>`` of a file's bytes, or ``url:<normalised URL>`` of a web page or of
media fetched from a URL (a page that changed is still the same document). Its **id** is
``doc_`` + the first 24 hex digits of SHA-256(owner, newline, content key): the same
input of the same owner always gets the same id, so ingesting it again replaces its
chunks, and two owners never share one. Its **source** is the name the client gave: the
uploaded file's name, or the URL as submitted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from morag.services.ingestion.specs import normalise_url

_READ_BYTES = 1 << 20


def document_id(owner: str, content_key: str) -> str:
    return "doc_" + hashlib.sha256(f"{owner}\n{content_key}".encode()).hexdigest()[:24]


def file_content_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def url_content_key(url: str) -> str:
    try:
        return f"url:{normalise_url(url)}"
    except Exception:  # a URL the fetcher took but httpx cannot re-parse: keep it as is
        return f"url:{url}"
