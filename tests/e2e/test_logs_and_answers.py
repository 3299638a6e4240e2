"""What hostile clients cannot do to the logs and the answers, over HTTP against real
``morag api`` and ``morag worker`` processes: forge log lines with control characters,
read a webhook's secrets back from logs, history or status, or get an answer that does not
say where their JSON broke."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.conftest import RunningApi
from tests.harness import free_port, wait_for
from tests.webhook_receiver import Receiver, receivers

pytestmark = pytest.mark.usefixtures("isolated")

INGEST = "/api/v1/ingest"
STATUS = "/api/v1/status"
JSON = {"Content-Type": "application/json"}
# A character a terminal or log viewer would act on (a line ends with "\n" alone).
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def client(shared_api: RunningApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_api.url, timeout=15) as http:
        yield http


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receivers() as make:
        yield make()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def raw_request(base_url: str, request_line: bytes) -> bytes:
    """Send one request line as given (httpx would refuse or re-encode it); the answer."""
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


# --- log lines ---------------------------------------------------------------------------


@pytest.mark.parametrize("log_json", ["0", "1"], ids=["logfmt", "json"])
def test_control_characters_in_a_request_path_are_escaped_in_its_log_line(
    api_factory, log_json: str
) -> None:
    api = api_factory.start(log_json=log_json)
    forged = "%0d%0alevel=info event=request path=forged%1b[2J%00"
    with httpx.Client(base_url=api.url, timeout=15) as http:
        assert http.get(f"{STATUS}/encoded-{forged}").status_code == 422  # not a job id
        assert http.get(f"/nowhere-{forged}").status_code == 404
    # a raw CR in the request line: the HTTP parser refuses it before the app sees it
    answer = raw_request(api.url, b"GET /raw-\r-cr HTTP/1.1")
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert raw_request(api.url, b"GET /raw-\x1b[2J HTTP/1.1").startswith(b"HTTP/1.1 4")

    def request_lines() -> list[str]:
        return [line for line in api.log().split("\n") if "forged" in line]

    lines = wait_for(lambda: len(request_lines()) >= 2 and request_lines(), 10, "the log lines")
    assert len(lines) == 2, lines  # one line per request: no forged second line
    assert "/encoded-" in lines[0] and "/nowhere-" in lines[1]  # each whole on its line
    log = api.log()
    assert not RAW_CONTROL.search(log), [
        line for line in log.split("\n") if RAW_CONTROL.search(line)
    ]
    escaped = "-\\r\\nlevel=info event=request path=forged\\x1b[2J\\x00"
    status_read, other = (logged_fields(line, log_json) for line in lines)
    assert status_read["path"] == f"{STATUS}/encoded{escaped}"
    assert status_read["task_id"] == f"encoded{escaped}"
    assert other["path"] == f"/nowhere{escaped}"


def logged_fields(line: str, log_json: str) -> dict[str, str]:
    """The path and task id of a request line, as a log reader decodes them."""
    if log_json == "1":
        return {key: str(value) for key, value in json.loads(line).items()}
    quoted = re.findall(r'(path|task_id)="((?:[^"\\]|\\.)*)"', line)
    return {key: value.replace("\\\\", "\\") for key, value in quoted}


# --- webhook secrets ---------------------------------------------------------------------


def test_webhook_secrets_stay_out_of_logs_history_and_answers(
    shared_api: RunningApi, client: httpx.Client, workers, receiver: Receiver
) -> None:
    """A real job's webhook is delivered with its token (the record keeps the full URL),
    and a failing one is reported, without the token appearing anywhere else."""
    token = "tok-8d1f2c-never-shown"
    worker = workers.start(webhook_max_attempts="1")
    delivered_hook = receiver.url(f"/hook?token={token}")
    failing_hook = f"http://127.0.0.1:{free_port()}/hook?token={token}"  # nothing listens
    submitted = {}
    for name, hook in (("delivered", delivered_hook), ("failing", failing_hook)):
        answer = client.post(
            f"{INGEST}/file",
            files={"file": (f"{name}.md", f"# {name}\n\nA job whose webhook {name}.\n".encode())},
            data={"webhook_url": hook},
        )
        assert answer.status_code == 202, answer.text
        submitted[name] = answer.json()["task_id"]

    (request,) = receiver.wait_requests(1)
    assert request.path == f"/hook?token={token}"  # delivery used the full URL

    def webhook_outcome(task_id: str) -> str | None:
        events = client.get(f"{STATUS}/{task_id}/history").json()["events"]
        outcomes = [e.get("webhook_outcome") for e in events if e["stage"] == "webhook"]
        return outcomes[-1] if outcomes else None

    wait_for(lambda: webhook_outcome(submitted["delivered"]) == "delivered", 30, "delivered")
    wait_for(lambda: webhook_outcome(submitted["failing"]) == "failed", 30, "failed")

    for name, task_id in submitted.items():
        hook = delivered_hook if name == "delivered" else failing_hook
        status = client.get(f"{STATUS}/{task_id}")
        assert status.json()["webhook_url"] == hook.split("?")[0]
        history = client.get(f"{STATUS}/{task_id}/history")
        assert token not in status.text and token not in history.text
    failed = client.get(f"{STATUS}/{submitted['failing']}/history").json()["events"][-1]
    assert f"cannot connect to {failing_hook.split('?')[0]}" in failed["message"]
    listed = client.get(f"{STATUS}/")
    assert len(listed.json()["items"]) == 2 and token not in listed.text

    worker_log, api_log = worker.log(), shared_api.log()
    assert "webhook delivered" in worker_log and "webhook failed for good" in worker_log
    assert f"webhook={failing_hook.split('?')[0]}" in worker_log
    assert token not in worker_log
    assert token not in api_log


# --- JSON errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"url": "https://example.com/" "x": 1}', "Expecting ',' delimiter at line 1, column 32"),
        (
            b'{\n  "url": "https://example.com/",\n  "source_type" "web"\n}',
            "Expecting ':' delimiter at line 3, column 17",
        ),
        (
            b'{"url": "https://example.com/",}',
            "Expecting property name enclosed in double quotes at line 1, column 32",
        ),
        (b'{"url": ', "Expecting value at line 1, column 9"),
    ],
)
def test_malformed_json_says_where_it_broke(client: httpx.Client, body: bytes, reason: str) -> None:
    """The URL route (through its fast path) and the batch route, each in its parser's words."""
    url_error = error_of(client.post(f"{INGEST}/url", content=body, headers=JSON), 422)
    assert url_error["code"] == "invalid_input"
    assert url_error["message"] == f"the request body is not valid JSON: {reason}"
    assert url_error["details"]["errors"] == [{"field": "body", "message": reason}]

    batch = body.replace(b'{"url"', b'{"items": [{"url"', 1)
    batch_error = error_of(client.post(f"{INGEST}/batch", content=batch, headers=JSON), 422)
    assert batch_error["message"].startswith("the request body is not valid JSON: ")
    assert re.search(r" at line \d+, column \d+$", batch_error["message"]), batch_error


def test_deeply_nested_json_is_a_clean_4xx_everywhere(client: httpx.Client) -> None:
    nested = "[" * 100_000
    url_error = error_of(client.post(f"{INGEST}/url", content=nested, headers=JSON), 422)
    assert url_error["message"] == "the request body is nested too deeply"
    batch_error = error_of(client.post(f"{INGEST}/batch", content=nested, headers=JSON), 422)
    assert batch_error["message"].startswith("the request body is not valid JSON: recursion")
    items_error = error_of(
        client.post(f"{INGEST}/batch", data={"items": nested}, files={"files": ("a.md", b"# a\n")}),
        422,
    )
    assert items_error["message"].startswith("the items field is not valid JSON: recursion")
    assert items_error["details"]["field"] == "items"
    metadata_error = error_of(
        client.post(
            f"{INGEST}/file", data={"metadata": "[" * 10_000}, files={"file": ("a.md", b"# a\n")}
        ),
        422,
    )
    assert metadata_error["message"].startswith("metadata is not valid JSON")
