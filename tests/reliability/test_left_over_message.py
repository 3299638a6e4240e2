"""A finished job's message that its worker never acked is dropped, not run again.

A worker acks a job's message a few milliseconds after the job ended: the ack waits for
the next delivery's Redis call (core/broker.py). A worker killed in between leaves the
message in kombu's ``unacked`` hash, where it counted as in flight and would have been
delivered again after the visibility timeout (hours). Here that state is made
deterministic: the job's own message, copied off the queue before a worker took it, is
put back into the hash after the job ended, as that dead worker would have left it. The
recovery loop of a live worker drops it once past the grace period; the job keeps its
one run.
"""

from __future__ import annotations

import json
import time

from kombu.utils import json as kombu_json

from morag.services.jobs import TaskStatus
from tests.harness import wait_for
from tests.reliability.support import wait_all_final


def test_an_ended_jobs_unacked_message_is_dropped(
    workers, submitter, redis_client, namespace
) -> None:
    task_id = submitter.probe(steps=1)
    queue = f"{namespace}:celery"
    raw = redis_client.lindex(queue, 0)
    assert raw is not None and json.loads(raw)["headers"]["id"] == task_id
    workers.start(queues="celery", recovery_grace_seconds="1", recovery_interval="0.2")
    record = wait_all_final(submitter.store, [task_id], timeout=30)[task_id]
    assert record.status is TaskStatus.SUCCESS and record.attempts == 1

    unacked, index = f"{namespace}:unacked", f"{namespace}:unacked_index"
    wait_for(lambda: redis_client.hlen(unacked) == 0, 10, "the worker to ack the job")
    tag = json.loads(raw)["properties"]["delivery_tag"]
    redis_client.zadd(index, {tag: time.time() - 5})  # delivered 5 s ago, never acked
    redis_client.hset(unacked, tag, kombu_json.dumps([json.loads(raw), "", "celery"]))

    wait_for(lambda: redis_client.hlen(unacked) == 0, 15, "recovery to drop the message")
    assert redis_client.zcard(index) == 0
    assert redis_client.llen(queue) == 0, "dropped, not queued again"
    after = submitter.store.get(task_id)
    assert after is not None and after.status is TaskStatus.SUCCESS and after.attempts == 1
    assert [e["state"] for e in submitter.store.history(task_id)].count("started") == 1
