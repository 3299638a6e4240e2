"""Tenants: two API keys and an admin key against a real API and a real worker.

Every job belongs to the key that submitted it (by the key's name): another key's job id
answers exactly as an unknown one on every endpoint (status, result, history, artefacts,
events, cancel, retry, batches), lists and dedupe never cross owners, Idempotency-Keys are
per owner, and the admin key sees and cancels everything. Keys never reach Redis or logs.
"""

from __future__ import annotations

import json
import uuid

import httpx

from morag.core.config import settings
from morag.core.redis_conn import get_redis
from tests.harness import wait_for

INGEST = "/api/v1/ingest"
STATUS = "/api/v1/status"
ALPHA, BRAVO, OPS = "alpha-key-0123456789", "bravo-key-0123456789", "ops-key-0123456789"
KEYS = {"api_keys": f"alpha:{ALPHA},bravo:{BRAVO}", "admin_keys": f"ops:{OPS}"}


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def upload(http: httpx.Client, key: str, text: str, **headers: str) -> str:
    reply = http.post(
        f"{INGEST}/file",
        files={"file": ("notes.md", text.encode())},
        headers={**as_key(key), **headers},
    )
    assert reply.status_code == 202, reply.text
    return str(reply.json()["task_id"])


def wait_final(http: httpx.Client, key: str, task_id: str) -> dict:
    def final() -> dict | None:
        body = http.get(f"{STATUS}/{task_id}", headers=as_key(key)).json()
        return body if body["status"] in ("success", "failure", "revoked") else None

    return wait_for(final, 60, f"job {task_id} to finish", interval=0.1)


def unknown_answer(response: httpx.Response, task_id: str) -> None:
    """A 404 reading exactly as the answer for an id that was never issued."""
    assert response.status_code == 404, response.text
    body = response.json()
    assert body["error"]["code"] == "not_found", body


def every_read_is_unknown(http: httpx.Client, key: str, task_id: str) -> None:
    never = str(uuid.uuid4())
    for suffix in ("", "/result", "/history", "/events", "/artifacts/keyframe_0000.jpg"):
        theirs = http.get(f"{STATUS}/{task_id}{suffix}", headers=as_key(key))
        nobody = http.get(f"{STATUS}/{never}{suffix}", headers=as_key(key))
        unknown_answer(theirs, task_id)
        assert theirs.json() == json.loads(nobody.text.replace(never, task_id)), suffix
    unknown_answer(http.delete(f"{INGEST}/{task_id}", headers=as_key(key)), task_id)
    unknown_answer(http.post(f"{INGEST}/{task_id}/retry", headers=as_key(key)), task_id)


def test_each_key_sees_only_its_own_jobs(api_process, workers, tmp_path) -> None:
    base, api = api_process(**KEYS)
    with httpx.Client(base_url=base, timeout=20) as http:
        # No worker yet: jobs stay queued, so content dedupe would join them.
        a_job = upload(http, ALPHA, "# Alpha\n\nthe alpha notes\n")
        assert upload(http, ALPHA, "# Alpha\n\nthe alpha notes\n") == a_job  # joins its own
        b_same = upload(http, BRAVO, "# Alpha\n\nthe alpha notes\n")
        assert b_same != a_job  # never another owner's job: no oracle of what A processes
        a_pending = http.post(
            f"{INGEST}/url", json={"url": "https://example.com/a"}, headers=as_key(ALPHA)
        ).json()["task_id"]
        batch = http.post(
            f"{INGEST}/batch",
            json={"items": [{"url": "https://example.com/b1"}, {"url": "https://example.com/b2"}]},
            headers=as_key(ALPHA),
        )
        assert batch.status_code == 202, batch.text
        batch_id = batch.json()["batch_id"]
        # The same Idempotency-Key from two owners: two jobs.
        idem = {"Idempotency-Key": "same-key"}
        a_idem = upload(http, ALPHA, "# idem\n", **idem)
        b_idem = upload(http, BRAVO, "# idem\n", **idem)
        assert a_idem != b_idem and upload(http, ALPHA, "# idem\n", **idem) == a_idem

        # B cannot cancel A's queued job, nor see it: it stays queued.
        every_read_is_unknown(http, BRAVO, a_pending)
        status = http.get(f"{STATUS}/{a_pending}", headers=as_key(ALPHA)).json()
        assert status["status"] == "pending" and status["owner"] == "alpha"
        batch_of_b = http.get(f"/api/v1/batches/{batch_id}", headers=as_key(BRAVO))
        assert batch_of_b.status_code == 404
        assert http.get(f"/api/v1/batches/{batch_id}", headers=as_key(ALPHA)).status_code == 200

        # The admin cancels A's URL job (no worker would fetch it anyway).
        cancelled = http.delete(f"{INGEST}/{a_pending}", headers=as_key(OPS))
        assert cancelled.status_code == 202 and cancelled.json()["outcome"] == "revoked"

        workers.start(queues="document_processing")
        assert wait_final(http, ALPHA, a_job)["status"] == "success"
        assert wait_final(http, BRAVO, b_same)["status"] == "success"
        every_read_is_unknown(http, BRAVO, a_job)
        every_read_is_unknown(http, ALPHA, b_same)
        own = http.get(f"{STATUS}/{a_job}/result", headers=as_key(ALPHA))
        assert own.status_code == 200 and "alpha notes" in own.json()["markdown"]
        with http.stream("GET", f"{STATUS}/{a_job}/events", headers=as_key(ALPHA)) as stream:
            assert stream.status_code == 200
            assert "event: success" in "".join(stream.iter_text())

        # Retry: B cannot re-run A's cancelled job; the admin can, and it stays A's.
        unknown_answer(http.post(f"{INGEST}/{a_pending}/retry", headers=as_key(BRAVO)), a_pending)
        retried = http.post(f"{INGEST}/{a_pending}/retry", headers=as_key(OPS))
        assert retried.status_code == 202, retried.text
        again = retried.json()["task_id"]
        assert http.get(f"{STATUS}/{again}", headers=as_key(ALPHA)).json()["owner"] == "alpha"
        http.delete(f"{INGEST}/{again}", headers=as_key(ALPHA))

        def listed(key: str, **params: str) -> set[str]:
            reply = http.get(f"{STATUS}/", params={"limit": 500, **params}, headers=as_key(key))
            assert reply.status_code == 200, reply.text
            return {item["task_id"] for item in reply.json()["items"]}

        alphas, bravos = listed(ALPHA), listed(BRAVO)
        assert a_job in alphas and a_pending in alphas and a_idem in alphas
        assert bravos == {b_same, b_idem}
        assert listed(BRAVO, owner="alpha") == bravos  # only an admin may name an owner
        assert listed(OPS) == alphas | bravos
        assert listed(OPS, owner="bravo") == bravos

    # The record names the owner; no key is stored or logged anywhere.
    redis_client = get_redis(settings.redis_url)
    owner = redis_client.hget(f"{settings.key_prefix}:job:{a_job}", "owner")
    assert owner == b"alpha"
    for raw in redis_client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        assert b"key-0123456789" not in raw
        if redis_client.type(raw) == b"hash":
            values = b" ".join(redis_client.hvals(raw))
            assert b"key-0123456789" not in values, raw
    assert "key-0123456789" not in api.log()
    assert "owner=alpha" in api.log() and "owner=bravo" in api.log()


def test_a_key_check_comes_before_the_body(api_process) -> None:
    """A deeply nested JSON body without a key costs nothing: 401, never parsed."""
    base, _ = api_process(**KEYS)
    nested = "[" * 100_000 + "]" * 100_000
    with httpx.Client(base_url=base, timeout=20) as http:
        for path in (f"{INGEST}/url", f"{INGEST}/batch"):
            reply = http.post(path, content=nested, headers={"Content-Type": "application/json"})
            assert reply.status_code == 401, reply.text
