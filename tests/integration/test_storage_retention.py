"""Storage stays bounded (services/retention.py): a job's owned input goes when the job is
final, however it ended, unless inputs are kept until the record expires; a retry after
that answers 410; the job index loses only entries whose records expired; every key a
finished job leaves has a TTL. Real Redis, real worker processes."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path

import pytest
import redis

from morag.core.celery_app import celery_app
from morag.core.config import settings
from morag.core.errors import InputGoneError
from morag.services.ingestion import IngestionService
from morag.services.jobs import JobStore, TaskStatus, get_job_store
from morag.services.retention import StorageJanitor
from morag.services.uploads import StoredFile, stored_name
from morag.tasks.system_tasks import probe
from tests.harness import wait_for

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def service() -> IngestionService:
    return IngestionService(settings, celery_app)


def store_upload(upload_dir: Path, content: bytes, name: str = "notes.md") -> StoredFile:
    """A file as the API's upload reader leaves it in the upload directory."""
    path = upload_dir / stored_name(name)
    path.write_bytes(content)
    return StoredFile("file", path, name, len(content), hashlib.sha256(content).hexdigest())


def submit_upload(
    service: IngestionService, upload_dir: Path, content: bytes, name: str = "notes.md"
) -> tuple[str, Path]:
    stored = store_upload(upload_dir, content, name)
    submission = service.submissions.submit(service.checks.prepare_file(stored))
    assert not submission.duplicate
    return submission.task_id, stored.path


def wait_final(task_id: str, timeout: float = 60) -> TaskStatus:
    store = get_job_store(settings)
    return wait_for(
        lambda: (i := store.get(task_id)) is not None and i.status.is_final and i.status,
        timeout,
        f"job {task_id} to end",
    )


def wait_gone(path: Path, timeout: float = 30) -> None:
    wait_for(lambda: not path.exists(), timeout, f"{path.name} to be deleted")


def janitor_rounds(client: redis.Redis, rounds: int = 2, timeout: float = 30) -> None:
    """Wait until the workers' janitors have run ``rounds`` full rounds from now.

    A round sweeps inputs before it takes the index-prune lock; the lock coming back
    after it was deleted marks a round under way, so the second return marks a whole
    round (inputs swept) that started after this call.
    """
    lock = get_job_store(settings).keys.index_prune_lock
    for n in range(rounds):
        client.delete(lock)
        wait_for(lambda: client.exists(lock), timeout, f"janitor round {n + 1}")


def test_a_finished_jobs_upload_is_deleted(workers, service, upload_dir: Path) -> None:
    workers.start(queues="document_processing")
    task_id, path = submit_upload(service, upload_dir, b"# Done\n\nA finished job.\n")
    assert wait_final(task_id) is TaskStatus.SUCCESS
    wait_gone(path)
    store = get_job_store(settings)
    wait_for(lambda: store.redis.zcard(store.keys.inputs_due) == 0, 10, "the entry to go")


def test_a_failed_jobs_upload_is_deleted_and_a_retry_says_so(
    workers, service, upload_dir: Path
) -> None:
    workers.start(queues="document_processing")
    task_id, path = submit_upload(service, upload_dir, b"%PDF-1.4\nnot a pdf\n", "bad.pdf")
    assert wait_final(task_id) is TaskStatus.FAILURE
    wait_gone(path)
    files_before = set(upload_dir.iterdir())
    with pytest.raises(InputGoneError) as raised:
        service.submissions.retry(task_id)
    error = raised.value
    assert error.http_status == 410 and error.code == "input_gone"
    assert "deleted when the job finished" in error.message
    assert "MORAG_KEEP_INPUTS_UNTIL_EXPIRY" in error.message
    # the refusal left nothing behind: no retry recorded, no file
    assert (
        get_job_store(settings).redis.hget(get_job_store(settings).keys.job(task_id), "retried_by")
        is None
    )
    assert set(upload_dir.iterdir()) == files_before


def test_a_queued_job_cancelled_before_any_worker_saw_it(
    workers, service, upload_dir: Path
) -> None:
    # No worker consumes documents: the job is cancelled in the queue, in the API's
    # write, and a worker on another queue (which never sees the job) deletes its upload.
    task_id, path = submit_upload(service, upload_dir, b"# Never run\n")
    outcome, status = service.submissions.cancel(task_id)
    assert (outcome, status) == ("revoked", TaskStatus.REVOKED)
    assert path.exists()
    workers.start(queues="celery")
    wait_gone(path)
    assert get_job_store(settings).history(task_id)[-1]["state"] == "revoked"


def test_inputs_are_kept_until_expiry_with_the_setting(
    workers, service, upload_dir: Path, redis_client: redis.Redis
) -> None:
    workers.start(queues="document_processing", keep_inputs_until_expiry="true")
    task_id, path = submit_upload(service, upload_dir, b"%PDF-1.4\nstill not a pdf\n", "x.pdf")
    assert wait_final(task_id) is TaskStatus.FAILURE
    janitor_rounds(redis_client)
    assert path.exists()  # kept: the janitor has looked twice since the job ended

    # ... so a retry finds it, under a name of its own
    retried = service.submissions.retry(task_id)
    retry_input = json.loads(
        redis_client.hget(get_job_store(settings).keys.job(retried.task_id), "owned_files")
    )
    assert retry_input != [str(path)] and Path(retry_input[0]).read_bytes() == path.read_bytes()
    assert wait_final(retried.task_id) is TaskStatus.FAILURE

    # ... and it goes when the record does (a janitor looking from after the retention)
    janitor = StorageJanitor(
        get_job_store(settings),
        upload_dir=upload_dir,
        artifact_dir=upload_dir,
        keep_inputs_until_expiry=True,
    )
    assert janitor.sweep_inputs(now=time.time() - 60) == 0
    assert janitor.sweep_inputs(now=time.time() + settings.result_retention_seconds + 1) == 2
    assert not path.exists() and not Path(retry_input[0]).exists()


def test_a_download_is_owned_by_its_job() -> None:
    store = get_job_store(settings)
    task_id = str(uuid.uuid4())
    store.create(task_id, kind="audio", queue="audio_processing", task_name="audio")
    path = settings.upload_dir / f"{task_id}.wav"  # type: ignore[operator]
    assert store.own_file(task_id, str(path)) == "ok"
    assert store.own_file(task_id, str(path)) == "ok"  # a second attempt: listed once
    assert json.loads(store.redis.hget(store.keys.job(task_id), "owned_files")) == [str(path)]
    assert store.request_cancel(task_id).outcome == "revoked"
    (entry,) = store.redis.zrange(store.keys.inputs_due, 0, -1)
    assert json.loads(entry) == {"task_id": task_id, "files": [str(path)]}
    assert store.own_file("no-such-job", "/x") == "missing"


def test_files_outside_the_upload_dir_are_never_deleted(tmp_path: Path) -> None:
    store = get_job_store(settings)
    outside = tmp_path / "users-own.md"
    outside.write_text("mine")
    store.redis.zadd(
        store.keys.inputs_due,
        {json.dumps({"task_id": "t1", "files": [str(outside), "../../etc/passwd"]}): 1.0},
    )
    janitor = StorageJanitor(
        store, upload_dir=settings.upload_dir, artifact_dir=settings.artifact_dir
    )  # type: ignore[arg-type]
    assert janitor.sweep_inputs() == 0
    assert outside.read_text() == "mine"
    assert store.redis.zcard(store.keys.inputs_due) == 0  # the entry is settled all the same


def test_prune_index_removes_only_entries_whose_records_expired(
    redis_client: redis.Redis, namespace: str
) -> None:
    store = JobStore(redis_client, namespace, retention_seconds=60)
    old = time.time() - 3600
    # Created an hour ago and still queued: no TTL yet, so it must stay listed.
    store.create("queued-long", kind="system", queue="celery", task_name="probe")
    # Created an hour ago, finished, its record still kept.
    store.create("finished-kept", kind="system", queue="celery", task_name="probe")
    store.start("finished-kept", worker="w", lease_seconds=5, max_attempts=3)
    store.finish("finished-kept", TaskStatus.SUCCESS, worker="w")
    # Recent, record gone by other means: newer than the retention, not looked at.
    store.create("recent", kind="system", queue="celery", task_name="probe")
    redis_client.delete(store.keys.job("recent"))
    # More expired ones than one prune batch, around the kept ones.
    expired = {f"expired-{n:04d}": old - 1 + n / 1000 for n in range(1200)}
    redis_client.zadd(store.keys.job_index, expired)
    redis_client.zadd(store.keys.job_index, {"queued-long": old + 0.3, "finished-kept": old + 0.9})

    assert store.prune_index() == 1200
    left = {m.decode() for m in redis_client.zrange(store.keys.job_index, 0, -1)}
    assert left == {"queued-long", "finished-kept", "recent"}
    assert store.prune_index() == 0


def test_a_worker_prunes_the_index_of_expired_jobs(workers, redis_client: redis.Redis) -> None:
    workers.start(queues="celery", result_retention_seconds="1", index_prune_interval="0.2")
    store = get_job_store(settings)
    job = probe.apply_async(kwargs={"steps": 0})
    assert wait_final(job.id) is TaskStatus.SUCCESS
    wait_for(lambda: not redis_client.exists(store.keys.job(job.id)), 10, "the record to expire")
    wait_for(
        lambda: redis_client.zscore(store.keys.job_index, job.id) is None,
        15,
        "the index entry to be pruned",
    )


def _keys_without_ttl(client: redis.Redis, namespace: str) -> dict[str, str]:
    """Keys of the namespace that never expire, but for the shared structures that
    shrink as work is done (queues, the index, the due sets) and kombu's bindings (one per
    queue, with their refresh deadlines), and the deployment's metrics counters and worker
    index (bounded: one field per kind, state, stage and route; one entry per worker)."""
    shared = (
        ":jobs",  # the index of all jobs, and each owner's (<prefix>:owner:<name>:jobs)
        ":owners",
        ":metrics",
        ":metrics:http",
        ":workers",
        ":cleanup:inputs",
        ":cleanup:artifacts",
        ":webhooks:outbox",
        ":webhooks:inflight",
        ":webhooks:scheduled",
        ":webhooks:claims",
        ":unacked",
        ":unacked_index",
        ":unacked_mutex",
    )
    found = {}
    for raw in client.scan_iter(match=f"{namespace}*", count=1000):
        key = raw.decode(errors="replace")
        if "_kombu.binding" in key or key.endswith(shared):
            continue
        if client.ttl(raw) == -1:
            found[key] = client.type(raw).decode()
    return found


def test_every_key_a_finished_job_leaves_expires(
    workers, service, upload_dir: Path, redis_client: redis.Redis, namespace: str
) -> None:
    workers.start(queues="document_processing,celery")
    store = get_job_store(settings)
    uploads = [store_upload(upload_dir, f"# Upload {n}\n".encode()) for n in range(4)]
    ok = service.submissions.submit(service.checks.prepare_file(uploads[0])).task_id
    idem = service.submissions.submit(
        service.checks.prepare_file(uploads[1]), idempotency_key="k1"
    ).task_id
    batch = service.submissions.submit_batch(
        [service.checks.prepare_file(stored) for stored in uploads[2:]], idempotency_key="k2"
    )
    failed, failed_path = submit_upload(service, upload_dir, b"%PDF-1.4\nno\n", "no.pdf")
    running = probe.apply_async(kwargs={"steps": 200, "step_seconds": 0.05}).id
    wait_for(lambda: store.get(running).status.value == "progress", 30, "the probe to run")
    service.submissions.cancel(running)
    # Two ends decided by the claim: a redelivered job that was being cancelled, and one
    # out of attempts.
    for task_id, attempts in (("claim-cancelled", 0), ("claim-exhausted", 3)):
        store.create(task_id, kind="system", queue="celery", task_name="probe")
        store.redis.hset(store.keys.job(task_id), mapping={"state": "started"})
        store.redis.hset(store.keys.job(task_id), "attempts", attempts)
    store.request_cancel("claim-cancelled")
    ends = {
        "claim-cancelled": store.start(
            "claim-cancelled", worker="w", lease_seconds=5, max_attempts=3
        ).outcome,
        "claim-exhausted": store.start(
            "claim-exhausted", worker="w", lease_seconds=5, max_attempts=3
        ).outcome,
    }
    assert ends == {"claim-cancelled": "cancelled", "claim-exhausted": "exhausted"}

    jobs = [ok, idem, *batch.task_ids, failed, running, *ends]
    for task_id in jobs:
        wait_final(task_id)
    wait_for(lambda: redis_client.zcard(store.keys.inputs_due) == 0, 30, "inputs to go")
    assert not any(path.exists() for path in [*(u.path for u in uploads), failed_path])
    assert _keys_without_ttl(redis_client, namespace) == {}


def test_keyframes_go_when_the_record_expires(tmp_path: Path) -> None:
    store = get_job_store(settings)
    task_id = str(uuid.uuid4())
    store.create(task_id, kind="video", queue="video_processing", task_name="video")
    store.start(task_id, worker="w", lease_seconds=5, max_attempts=3)
    folder = tmp_path / task_id
    folder.mkdir()
    (folder / "keyframe_0000_0.0s.jpg").write_bytes(b"\xff\xd8")
    store.finish(task_id, TaskStatus.SUCCESS, worker="w")
    janitor = StorageJanitor(store, upload_dir=tmp_path / "uploads", artifact_dir=tmp_path)
    assert janitor.sweep_artifacts() == 0 and folder.is_dir()  # the record is still kept
    later = time.time() + settings.result_retention_seconds + 1
    assert janitor.sweep_artifacts(now=later) == 1
    assert not folder.exists() and store.redis.zcard(store.keys.artifacts_due) == 0
