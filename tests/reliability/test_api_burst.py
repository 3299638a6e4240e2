"""Scenario 3 (API level): a burst of small-document uploads from concurrent HTTP clients.

Sixteen client threads upload distinct small Markdown documents (``POST
/api/v1/ingest/file``) as fast as one API process answers; two workers (two processes
each) process them. Zero 5xx, every upload accepted, every job SUCCESS exactly once, and
the memory of the API and of each worker stays bounded (peak RSS of each process tree,
sampled every 200 ms).

Quick: 300 uploads. Full (``-m slow``): 5,000 uploads, to be submitted in under a minute.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.reliability.support import RssSampler, audit, percentile, wait_all_final

CLIENTS = 16


@pytest.mark.parametrize(
    "jobs", [pytest.param(300, id="quick"), pytest.param(5000, id="full", marks=pytest.mark.slow)]
)
def test_api_burst_of_uploads_loses_nothing(
    api_process, workers, submitter, report, jobs: int
) -> None:
    base, api = api_process()
    pool = [workers.start(queues="document_processing", concurrency=2) for _ in range(2)]
    statuses: Counter[int] = Counter()
    latencies: list[float] = []

    def client(n: int) -> list[str]:
        ids = []
        with httpx.Client(base_url=base, timeout=60) as http:
            for i in range(n, jobs, CLIENTS):
                body = f"# Note {i}\n\nBurst upload {i} from client {n}: queues keep jobs.\n"
                asked = time.monotonic()
                response = http.post(
                    "/api/v1/ingest/file", files={"file": (f"note-{i}.md", body.encode())}
                )
                latencies.append(time.monotonic() - asked)
                statuses[response.status_code] += 1
                if response.status_code == 202:
                    ids.append(response.json()["task_id"])
        return ids

    with RssSampler() as rss:
        rss.watch("api", api.pid)
        for n, worker in enumerate(pool):
            rss.watch(f"worker{n}", worker.pid)
        rss.sample()
        baseline = rss.peak_mib()
        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as executor:
            ids = [i for batch in executor.map(client, range(CLIENTS)) for i in batch]
        submit_s = time.monotonic() - started
        records = wait_all_final(submitter.store, ids, timeout=60 + jobs / 10)
        drain_s = time.monotonic() - started

    tally = audit(f"burst/api-upload/{jobs}", submitter.store, ids, records)
    tally.submitted = jobs  # uploads attempted; refused ones never got an id
    tally.lost += jobs - len(ids)
    server_errors = sum(n for code, n in statuses.items() if code >= 500)
    report.record(
        tally,
        clients=CLIENTS,
        http_statuses=dict(statuses),
        submit_s=round(submit_s, 2),
        uploads_per_s=round(jobs / submit_s),
        upload_p50_ms=round(percentile(latencies, 0.5) * 1000),
        upload_p99_ms=round(percentile(latencies, 0.99) * 1000),
        all_final_s=round(drain_s, 1),
        rss_start_mib=baseline,
        rss_peak_mib=rss.peak_mib(),
    )
    assert server_errors == 0 and statuses[202] == jobs, statuses
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert tally.completed == jobs, tally.problems
    if jobs >= 5000:
        assert submit_s < 60, submit_s
    for label, peak in rss.peak_mib().items():
        assert peak < 2 * baseline[label] + 200, (label, peak, baseline[label])
