"""``morag.client`` error handling, against an in-memory HTTP transport (no server)."""

from __future__ import annotations

import httpx
import pytest

from morag.client import MoragApiError, MoragClient


def client_answering(response: httpx.Response) -> MoragClient:
    return MoragClient("http://api.test", transport=httpx.MockTransport(lambda r: response))


def test_the_api_error_shape_is_read() -> None:
    body = {"error": {"code": "not_found", "message": "no job with id x", "details": {"a": 1}}}
    with pytest.raises(MoragApiError) as caught:
        client_answering(httpx.Response(404, json=body)).status("x")
    error = caught.value
    assert (error.status, error.code, error.message, error.details) == (
        404,
        "not_found",
        "no job with id x",
        {"a": 1},
    )
    assert str(error) == "no job with id x (HTTP 404 not_found)"


def test_a_foreign_error_page_is_reported_as_is() -> None:
    with pytest.raises(MoragApiError) as caught:
        client_answering(httpx.Response(502, text="<h1>Bad gateway</h1>")).jobs()
    assert caught.value.code == "http_error" and "Bad gateway" in caught.value.message


def test_the_api_key_is_sent_as_a_bearer_token() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"items": [], "offset": 0, "limit": 5})

    api = MoragClient("http://api.test/", api_key="k1", transport=httpx.MockTransport(answer))
    api.jobs(state="success", limit=5)
    assert seen[0].headers["authorization"] == "Bearer k1"
    assert str(seen[0].url) == "http://api.test/api/v1/status/?limit=5&offset=0&state=success"


def test_an_unreachable_api_is_named() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    api = MoragClient("http://api.test", transport=httpx.MockTransport(refuse))
    with pytest.raises(MoragApiError) as caught:
        api.status("x")
    assert caught.value.code == "unreachable" and caught.value.status == 0
    assert "cannot reach the morag API at http://api.test" in caught.value.message


def test_waiting_comes_back_after_a_stream_refused_for_now() -> None:
    """A server that holds as many streams as it takes answers 429 or 503: ``wait``
    tries again a little later instead of failing."""
    answers = {"status": ["started"] * 3 + ["success"], "events": [429, 503, 200]}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            code = answers["events"].pop(0)
            if code != 200:
                error = {"code": "too_many_requests", "message": "busy", "details": {}}
                return httpx.Response(code, json={"error": error}, headers={"Retry-After": "1"})
            return httpx.Response(
                200,
                text='event: success\r\nid: t\r\ndata: {"state": "success"}\r\n\r\n',
                headers={"Content-Type": "text/event-stream"},
            )
        return httpx.Response(200, json={"task_id": "x", "status": answers["status"].pop(0)})

    api = MoragClient("http://api.test", transport=httpx.MockTransport(answer))
    seen: list[dict] = []
    assert api.wait("x", on_event=seen.append)["status"] == "success"
    assert [e["state"] for e in seen] == ["success"] and not answers["events"]
