"""A message the broker lost in delivery is queued again from its job record.

kombu's Redis transport takes a message with BRPOP and records the delivery (``unacked``)
in a second round trip; a BRPOP reply that never reaches the worker (Redis shut down, or
the connection dropped, at that instant) loses the message. test_redis_restart.py's
SIGTERM/6 s-outage variant lost one job this way (its AOF showed the RPOP and no unacked
entry). Here the loss is made deterministic: the oldest message is popped off the queue
by hand, as that BRPOP did, before any worker runs. The worker's recovery loop (at
start-up, after a Redis restart, after missed passes, and every 10 minutes) finds the
PENDING job whose message is nowhere and queues it again from the submission the record
keeps; a record that keeps none ends as a FAILURE that says the message was lost.
"""

from __future__ import annotations

import json
import time
import uuid

from morag.services.jobs import TaskStatus
from tests.reliability.support import PROBE, audit, wait_all_final


def test_message_lost_in_delivery_is_queued_again(
    workers, submitter, report, redis_client, namespace
) -> None:
    ids = [submitter.probe(steps=1, step_seconds=0.01) for _ in range(4)]
    bare = str(uuid.uuid4())  # a record whose submission is not known, and no message
    submitter.store.create(bare, kind="system", queue="celery", task_name=PROBE)
    raw = redis_client.rpop(f"{namespace}:celery")  # the BRPOP whose reply was lost
    lost = json.loads(raw)["headers"]["id"]
    assert lost == ids[0]

    started = time.monotonic()
    workers.start(queues="celery", recovery_grace_seconds="1")
    records = wait_all_final(submitter.store, [*ids, bare], timeout=30)
    recovered_s = records[lost].finished_at.timestamp() - time.time() + time.monotonic()
    tally = audit("lost-message/requeued", submitter.store, ids, records)
    report.record(tally, recovered_after_worker_start_s=round(recovered_s - started, 2))

    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert all(records[i].status is TaskStatus.SUCCESS and records[i].attempts == 1 for i in ids)
    stages = [e["stage"] for e in submitter.store.history(lost)]
    assert "requeued" in stages and stages.index("requeued") < stages.index("started")
    assert records[bare].status is TaskStatus.FAILURE
    assert records[bare].error_type == "MessageLost" and "submit it again" in records[bare].error
