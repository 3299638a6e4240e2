"""Scenario 3 (queue level): a burst of no-op jobs from concurrent clients.

Eight client threads submit probe jobs as fast as they can (record first, then the message,
by task name: the API's path without HTTP) to two workers with two processes each. Every
job must reach SUCCESS, exactly once, and the workers' memory must stay bounded (peak RSS
of each worker's process tree, sampled every 200 ms). The API-level burst (small documents
over HTTP) is in test_api_burst.py.

Quick: 300 jobs. Full (``-m slow``): 5,000 jobs; submission must take under a minute.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.reliability.support import RssSampler, audit, wait_all_final

CLIENTS = 8


@pytest.mark.parametrize(
    "jobs", [pytest.param(300, id="quick"), pytest.param(5000, id="full", marks=pytest.mark.slow)]
)
def test_queue_burst_loses_nothing(workers, submitter, report, jobs: int) -> None:
    pool = [workers.start(queues="celery", concurrency=2) for _ in range(2)]
    with RssSampler() as rss:
        for n, worker in enumerate(pool):
            rss.watch(f"worker{n}", worker.pid)
        rss.sample()
        baseline = rss.peak_mib()

        def client(n: int) -> list[str]:
            return [submitter.probe() for _ in range(jobs // CLIENTS + (n < jobs % CLIENTS))]

        started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as executor:
            ids = [i for batch in executor.map(client, range(CLIENTS)) for i in batch]
        submit_s = time.monotonic() - started
        records = wait_all_final(submitter.store, ids, timeout=60 + jobs / 20)
        drain_s = time.monotonic() - started

    tally = audit(f"burst/queue/{jobs}", submitter.store, ids, records)
    report.record(
        tally,
        clients=CLIENTS,
        submit_s=round(submit_s, 2),
        submit_per_s=round(jobs / submit_s),
        all_final_s=round(drain_s, 2),
        end_to_end_per_s=round(jobs / drain_s),
        rss_start_mib=baseline,
        rss_peak_mib=rss.peak_mib(),
    )
    assert tally.submitted == jobs
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert tally.completed == jobs, tally.problems
    if jobs >= 5000:
        assert submit_s < 60, submit_s
    for label, peak in rss.peak_mib().items():
        # Bounded: a worker tree (main + 2 children) stays within 2x its start + 150 MiB.
        assert peak < 2 * baseline[label] + 150, (label, peak, baseline[label])
