"""The per-job scripts (start, finish) carry their store's key names in their text: any
prefix works, and a Redis that lost its scripts is sent them again."""

from __future__ import annotations

import uuid

import pytest
import redis

from morag.services.jobs import JobStore, ProgressReport, TaskStatus, utcnow


def test_a_prefix_of_any_characters_names_every_key_the_scripts_write(
    redis_client: redis.Redis, namespace: str
) -> None:
    prefix = f'{namespace}:q"uo\\te d ü]]\n'  # quotes, backslash, space, non-ASCII, newline
    store = JobStore(redis_client, prefix, retention_seconds=60)
    try:
        store.create(
            "j1",
            kind="system",
            queue="celery",
            task_name="probe",
            extra={"webhook_url": "http://127.0.0.1:9/hook"},
        )
        assert store.start("j1", worker="w", lease_seconds=5, max_attempts=3).outcome == "ok"
        assert store.has_lease("j1")
        report = ProgressReport(0.5, "probing", "half", utcnow(), {"step": 1})
        outcome = store.finish(
            "j1",
            TaskStatus.SUCCESS,
            worker="w",
            summary={"n": 1},
            result={"n": 2},
            last_report=report,
        )
        assert outcome.outcome == "ok" and outcome.detail == "success"
        assert not store.has_lease("j1")
        assert store.result("j1") == {"n": 2}
        assert [e["state"] for e in store.history("j1")] == [
            "pending",
            "started",
            "progress",
            "success",
        ]
        assert 0 < redis_client.ttl(store.keys.job("j1")) <= 60
        assert 0 < redis_client.ttl(store.keys.history("j1")) <= 60
        assert redis_client.llen(store.keys.webhook_outbox) == 1
        metrics = redis_client.hgetall(store.keys.metrics)
        assert metrics[b"c|finished|system|success"] == b"1"
        assert metrics[b"h|stage|system|probing|0.1"] == b"1"
        k = store.keys
        written = {key.decode() for key in redis_client.scan_iter(match=f"{namespace}:q*")}
        assert written == {
            k.job("j1"),
            k.history("j1"),
            k.result("j1"),
            k.job_index,
            k.owner_jobs("anonymous"),
            k.owners,
            k.metrics,
            k.webhook_outbox,
        }
    finally:
        for key in redis_client.scan_iter(match=f"{namespace}:q*"):
            redis_client.delete(key)


def test_a_script_redis_no_longer_knows_is_loaded_again(
    redis_client: redis.Redis, namespace: str
) -> None:
    store = JobStore(redis_client, f"{namespace}:reload", retention_seconds=60)
    try:
        store.create("j2", kind="system", queue="celery", task_name="probe")
        unknown = "0" * 40  # as after a restart without the scripts
        store._start.sha = unknown
        assert store.start("j2", worker="w", lease_seconds=5, max_attempts=3).outcome == "ok"
        assert store._start.sha != unknown
        store._finish.sha = unknown
        assert (
            store.finish(
                "j2", TaskStatus.FAILURE, worker="w", error_type="E", error_message="boom"
            ).outcome
            == "ok"
        )
        job = store.get("j2")
        assert job is not None
        assert (job.status, job.error_type, job.error) == (TaskStatus.FAILURE, "E", "boom")
    finally:
        for key in redis_client.scan_iter(match=f"{namespace}:reload*"):
            redis_client.delete(key)


def test_a_script_whose_connection_was_closed_is_sent_again(
    redis_client: redis.Redis, namespace: str
) -> None:
    """The job scripts share one connection their client's pool lends them; one that
    Redis closed (a restart, ``CLIENT KILL``) is opened again and the call goes through.
    Any other error (a script error) reaches the caller. However many stores come and go
    on one client, they take no more connections (the pool holds 100 at most)."""
    name = f"kept-{uuid.uuid4().hex[:8]}"
    kwargs = {**redis_client.connection_pool.connection_kwargs, "client_name": name}
    client = redis.Redis(connection_pool=redis.ConnectionPool(**kwargs))
    store = JobStore(client, f"{namespace}:kept", retention_seconds=60)

    def kept_ids() -> list[int]:
        return [c["id"] for c in redis_client.client_list() if c.get("name") == name]

    try:
        for task_id in ("j3", "j4"):
            store.create(task_id, kind="system", queue="celery", task_name="probe")
        assert store.start("j3", worker="w", lease_seconds=5, max_attempts=3).outcome == "ok"
        before = kept_ids()  # the kept one, and the pooled one that loaded the scripts
        for client_id in before:
            redis_client.execute_command("CLIENT", "KILL", "ID", client_id)
        assert store.start("j4", worker="w", lease_seconds=5, max_attempts=3).outcome == "ok"
        assert kept_ids() and not set(kept_ids()) & set(before)
        opened = len(kept_ids())
        with pytest.raises(redis.ResponseError):
            store._start(client)  # no arguments: the script fails on its first line
        assert store.start("j3", worker="w", lease_seconds=5, max_attempts=3).outcome == "busy"

        for n in range(150):
            other = JobStore(client, f"{namespace}:kept", retention_seconds=60)
            assert other.create(f"n{n}", kind="system", queue="celery", task_name="p")
            assert other.start(f"n{n}", worker="w", lease_seconds=5, max_attempts=3).outcome
        assert len(kept_ids()) <= opened + 1  # + the pooled one that loaded the scripts
    finally:
        client.close()
        for key in redis_client.scan_iter(match=f"{namespace}:kept*"):
            redis_client.delete(key)
