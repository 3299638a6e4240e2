"""Webhook events and signatures, without I/O."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook, WebhookVerificationError

from morag.core.config import Settings
from morag.services.jobs import TaskInfo, TaskStatus
from morag.services.webhooks import (
    build_event,
    encode_event,
    message_id,
    retry_delay,
    signed_headers,
)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def test_six_attempts_span_about_five_minutes() -> None:
    delays = [retry_delay(attempt, 2.0) for attempt in range(1, 6)]
    assert delays == [2, 6, 18, 54, 162]
    assert 240 <= sum(delays) + 6 * 10 <= 330  # plus six 10 s attempts at worst


def test_signature_verifies_with_standard_webhooks_and_binds_the_body() -> None:
    body = b'{"type":"job.succeeded"}'
    now = datetime.now(UTC)
    headers = signed_headers(body, "msg_1_success", SECRET, now)
    assert headers["webhook-id"] == "msg_1_success"
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(SECRET).verify(body, headers) == {"type": "job.succeeded"}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(b'{"type":"job.failed"}', headers)


def test_without_a_secret_events_are_unsigned() -> None:
    headers = signed_headers(b"{}", "msg", "", datetime.now(UTC))
    assert "webhook-signature" not in headers and headers["webhook-id"] == "msg"


@pytest.mark.parametrize(
    ("state", "kind"),
    [("success", "job.succeeded"), ("failure", "job.failed"), ("revoked", "job.cancelled")],
)
def test_event_envelope(state: str, kind: str) -> None:
    finished = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    info = TaskInfo(
        task_id="t1",
        status=TaskStatus(state),
        kind="web",
        attempts=1,
        finished_at=finished,
        error="boom" if state == "failure" else None,
        error_type="ValueError" if state == "failure" else None,
        result={"chunk_count": 3} if state == "success" else None,
        metadata={"k": "v"},
        webhook_url="https://example.org/hook",
    )
    event = build_event(info, state, finished.isoformat())
    assert event["type"] == kind and event["timestamp"] == finished.isoformat()
    data = event["data"]
    assert data["task_id"] == "t1" and data["status"] == state and data["metadata"] == {"k": "v"}
    assert "webhook_url" not in data  # the receiver knows where it is
    assert (data["error"] is not None) == (state == "failure")
    assert encode_event(event).startswith(b'{"type":"' + kind.encode())
    assert message_id("t1", state) == f"msg_t1_{state}"


@pytest.mark.parametrize("secret", ["whsec_!!!", "whsec_" + base64.b64encode(b"short").decode()])
def test_unusable_secrets_are_refused_at_start_up(secret: str) -> None:
    with pytest.raises(ValidationError, match="webhook_secret"):
        Settings(_env_file=None, webhook_secret=secret)


def test_unpadded_and_prefixless_secrets_are_accepted() -> None:
    raw = base64.b64encode(b"x" * 32).decode()
    for secret in (raw, raw.rstrip("="), "whsec_" + raw.rstrip("=")):
        assert Settings(_env_file=None, webhook_secret=secret).webhook_secret == secret
