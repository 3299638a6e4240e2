"""The one Idempotency-Key flow (submit, batch and retry all run through it), on real Redis."""

from __future__ import annotations

from typing import Any

import pytest

from morag.core.errors import InvalidInputError
from morag.core.keys import RedisKeys
from morag.services.ingestion.idempotency import IdempotencyKeys

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def keys(redis_client, namespace: str) -> IdempotencyKeys:
    return IdempotencyKeys(redis_client, RedisKeys(namespace), retention_seconds=60)


def test_a_repeat_gets_the_answer_as_run_left_it(keys: IdempotencyKeys) -> None:
    """A batch whose item joined other work answers that job's id: the record ``run``
    changes in place (a nested list) is what a repeat gets."""
    runs: list[str] = []

    def run(record: dict[str, Any]) -> str:
        runs.append("ran")
        record["task_ids"][1] = "joined-job"
        return "first"

    def replay(record: dict[str, Any]) -> list[str]:
        return record["task_ids"]

    fresh = {"batch_id": "b1", "task_ids": ["t1", "t2"]}
    assert keys.once("alice", "k", "fp", fresh, run, replay) == "first"
    assert keys.once("alice", "k", "fp", {"task_ids": ["x", "y"]}, run, replay) == [
        "t1",
        "joined-job",
    ]
    assert runs == ["ran"]
    assert keys.once("bob", "k", "fp", {"task_ids": ["u"]}, lambda r: "bob's", replay) == "bob's"


def test_a_failed_run_releases_the_key(keys: IdempotencyKeys) -> None:
    def fail(record: dict[str, Any]) -> str:
        record["task_ids"].append("half-made")
        raise RuntimeError("publish failed")

    with pytest.raises(RuntimeError):
        keys.once("alice", "k", "fp", {"task_ids": []}, fail, lambda r: "replayed")
    again = keys.once("alice", "k", "fp", {"task_ids": []}, lambda r: "ran again", lambda r: "")
    assert again == "ran again"


def test_another_request_under_a_used_key_is_refused(keys: IdempotencyKeys) -> None:
    keys.once("alice", "k", "fp-1", {"task_id": "t"}, lambda r: "ok", lambda r: "")
    with pytest.raises(InvalidInputError, match="already used for a different request"):
        keys.once("alice", "k", "fp-2", {"task_id": "u"}, lambda r: "ok", lambda r: "")
