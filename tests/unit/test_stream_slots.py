"""Event-stream slots per owner and per process, and the SSE frames (no I/O)."""

from __future__ import annotations

import pytest

from morag.api.event_stream import frame
from morag.core.errors import OverloadedError, TooManyRequestsError
from morag.services.ingestion.stream_slots import StreamSlots


def test_an_owner_holds_its_share_and_the_process_its_total() -> None:
    slots = StreamSlots(per_owner=2, total=3)
    a1, a2 = slots.acquire("a"), slots.acquire("a")
    with pytest.raises(TooManyRequestsError) as refused:
        slots.acquire("a")
    assert (refused.value.http_status, refused.value.details) == (429, {"limit": 2})
    assert refused.value.retry_after and refused.value.retry_after > 0
    slots.acquire("b")
    with pytest.raises(OverloadedError) as full:
        slots.acquire("c")
    assert (full.value.http_status, full.value.code, full.value.details) == (
        503,
        "unavailable",
        {"limit": 3},
    )
    a1.release()
    a1.release()  # once, however often called
    assert (slots.held("a"), slots.held()) == (1, 2)
    slots.acquire("c")
    a2.release()
    assert slots.held("a") == 0


def test_frames_are_one_message_each() -> None:
    assert frame(event="started", id="t1", data='{"a": 1}', retry=1500) == (
        b'event: started\r\nid: t1\r\ndata: {"a": 1}\r\nretry: 1500\r\n\r\n'
    )
    assert frame(comment="ping") == b": ping\r\n\r\n"
    # a line break in a field would start another field: it is dropped
    assert frame(event="a\r\nid: forged") == b"event: aid: forged\r\n\r\n"
