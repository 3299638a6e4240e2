"""Event streams (SSE) against a real API process: limits per owner and per process (429,
503 with Retry-After), a maximum duration after which a reconnect with Last-Event-ID
loses and repeats nothing, a lost Redis connection said out loud, and (``-m slow``)
2,000 streams that leave /health answering in under 100 ms.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import httpx
import pytest

from tests.harness import ROOT, wait_for
from tests.reliability.raw_http import (
    Stream,
    header_of,
    probe_health,
    raise_nofile,
    refusal,
    submit_url_job,
)
from tests.reliability.support import RssSampler, Tally, percentile


def test_stream_limits_per_owner_and_per_process(api_process) -> None:
    keys = ["key-a-" + os.urandom(8).hex(), "key-b-" + os.urandom(8).hex()]
    keys.append("key-c-" + os.urandom(8).hex())
    base, _ = api_process(
        api_keys=",".join(keys), sse_max_streams_per_owner="3", sse_max_streams="5"
    )
    jobs = {key: submit_url_job(base, key) for key in keys}
    a, b, c = keys
    held = [Stream(base, jobs[a], a) for _ in range(3)]
    try:
        assert [s.status for s in held] == [200] * 3
        fourth = Stream(base, jobs[a], a)
        answer = fourth.refused()
        error = refusal(answer, 429, "too_many_requests")
        assert error["details"] == {"limit": 3}
        assert int(header_of(answer, b"retry-after") or 0) > 0
        held += [Stream(base, jobs[b], b) for _ in range(2)]  # another owner: served
        assert [s.status for s in held] == [200] * 5
        sixth = Stream(base, jobs[c], c)  # the process holds its 5
        answer = sixth.refused()
        assert refusal(answer, 503, "unavailable")["details"] == {"limit": 5}
        assert int(header_of(answer, b"retry-after") or 0) > 0
        held.pop(0).close()  # a stream ends: its slot is free again

        def reopened() -> Stream | None:
            stream = Stream(base, jobs[a], a)
            if stream.status == 200:
                return stream
            stream.close()
            return None

        held.append(wait_for(reopened, 10, "a closed stream's slot to be free again"))
    finally:
        for stream in held:
            stream.close()


def test_stream_closed_at_its_time_limit_resumes_with_last_event_id(
    api_process, workers, submitter, report
) -> None:
    """Streams end after MORAG_SSE_MAX_SECONDS (1.5 s here) while the job still runs;
    the client reconnects with the last id it saw, each time, and gets every event of
    the job's history exactly once."""
    base, _ = api_process(sse_max_seconds="1.5")
    workers.start(queues="celery")
    task_id = submitter.probe(steps=12, step_seconds=0.4)
    seen: list[dict] = []
    cuts, retries = 0, set()
    last = ""
    deadline = time.monotonic() + 60
    while not seen or seen[-1]["state"] not in ("success", "failure", "revoked"):
        assert time.monotonic() < deadline, seen
        stream = Stream(base, task_id, None, last_event_id=last)
        assert stream.status == 200
        frames = stream.frames()
        stream.close()
        events = [f for f in frames if "data" in f]
        retries |= {int(f["retry"]) for f in frames if "retry" in f}
        seen += [json.loads(f["data"]) for f in events]
        if events:
            last = events[-1]["id"]
        if frames and "comment" in frames[-1] and "reconnect" in frames[-1]["comment"]:
            cuts += 1
    history = submitter.store.redis.lrange(submitter.store.keys.history(task_id), 0, -1)
    expected = [{**json.loads(raw), "task_id": task_id} for raw in history]
    report.record(Tally("bounded/sse-time-limit"), streams=cuts + 1, events=len(seen))
    assert cuts >= 2, f"the stream was cut {cuts} times"
    assert retries and all(1000 <= r <= 3000 for r in retries), retries
    assert seen == expected  # nothing lost, nothing repeated, in order


@pytest.mark.slow
def test_two_thousand_streams_leave_health_fast(api_process, report) -> None:
    """2,000 SSE streams from 25 owners (80 each), opened 100 at a time from a process of
    their own: /health, probed over new connections all along, stays under 100 ms p99."""
    streams, owners = 2000, 25
    raise_nofile(streams * 3 + 1024)  # the API child inherits it
    keys = [f"crowd-key-{n}-{os.urandom(8).hex()}" for n in range(owners)]
    base, api = api_process(api_keys=",".join(keys))
    task_ids = [submit_url_job(base, key) for key in keys]
    crowd = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.reliability.sse_crowd",
            "--base",
            base,
            "--streams",
            str(streams),
            "--parallel",
            "100",
            *(arg for key in keys for arg in ("--key", key)),
            *task_ids,
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # The crowd stands for clients on other machines: on these two cores it yields to
        # the API (and to the probes), so /health measures the API, not the load generator.
        preexec_fn=lambda: os.nice(10),
    )
    assert crowd.stdin is not None and crowd.stdout is not None
    opening: list[float] = []
    held: list[float] = []
    try:
        with RssSampler() as rss:
            rss.watch("api", api.pid)
            rss.sample()
            start_mib = rss.peak_mib()["api"]
            deadline = time.monotonic() + 240
            while not select.select([crowd.stdout], [], [], 0)[0]:
                assert time.monotonic() < deadline, "the streams did not open in 240 s"
                assert crowd.poll() is None, "the crowd process died"
                opening.append(probe_health(base))
                time.sleep(0.05)
            opened = json.loads(crowd.stdout.readline())
            for _ in range(100):  # ~5 s with every stream held
                held.append(probe_health(base))
                time.sleep(0.05)
        crowd.stdin.close()
        closed = json.loads(crowd.stdout.readline())
    finally:
        crowd.kill()
        crowd.wait(30)
    figures = {
        "streams": opened["outcomes"],
        "open_seconds": opened["seconds"],
        "health_opening_ms": _ms(opening),
        "health_held_ms": _ms(held),
        "api_rss_start_mib": start_mib,
        "api_rss_peak_mib": rss.peak_mib()["api"],
    }
    report.record(Tally("bounded/2000-sse-streams"), **figures)
    assert opened["outcomes"] == {"open": streams}, figures
    assert closed["closed"] == streams, figures
    assert len(opening) >= 5, figures
    assert percentile(opening, 0.99) < 0.1, figures
    assert percentile(held, 0.99) < 0.1, figures


def _ms(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": round(percentile(samples, 0.5) * 1000, 1),
        "p99": round(percentile(samples, 0.99) * 1000, 1),
        "max": round(max(samples, default=0) * 1000, 1),
    }


def test_streams_fail_loudly_when_the_event_connection_drops(api_process, submitter) -> None:
    """Every stream of a process listens through one Redis connection. When it drops,
    each stream ends with an error event (events may have been missed: the client comes
    back with Last-Event-ID), never silently; the next stream opens a new connection."""
    base, _ = api_process()
    task_id = submit_url_job(base, None)
    stream = Stream(base, task_id, None)
    assert stream.status == 200
    redis_client = submitter.store.redis
    name = f"{submitter.settings.key_prefix}:event-hub"

    def hub_ids() -> list[str]:
        return [str(c["id"]) for c in redis_client.client_list() if c.get("name") == name]

    ids = wait_for(hub_ids, 10, "the API's event connection to show in CLIENT LIST")
    assert len(ids) == 1
    redis_client.execute_command("CLIENT", "KILL", "ID", ids[0])
    frames = stream.frames()
    stream.close()
    assert frames[-1]["event"] == "error", frames
    assert "reconnect with Last-Event-ID" in json.loads(frames[-1]["data"])["error"]["message"]
    again = Stream(base, task_id, None, last_event_id=frames[0]["id"])
    assert again.status == 200
    assert httpx.delete(f"{base}/api/v1/ingest/{task_id}", timeout=10).status_code == 202
    assert [f.get("event") for f in again.frames() if "data" in f] == ["revoked"]
    again.close()
