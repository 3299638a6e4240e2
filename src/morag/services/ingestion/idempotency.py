"""Idempotency-Key: a request repeated with the same key gets the original answer.

``<prefix>:idem:<principal>:<hash of the key>`` holds the answer (a job id, or a batch's
ids) and a fingerprint of the request; a different request under a used key is refused
(422). Submissions, batches and retries all run through ``IdempotencyKeys.once``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from morag.core.errors import InvalidInputError
from morag.core.keys import RedisKeys

Answer = TypeVar("Answer")


class IdempotencyKeys:
    def __init__(self, client: redis.Redis, keys: RedisKeys, retention_seconds: int) -> None:
        self.redis = client
        self.keys = keys
        self.retention_seconds = retention_seconds

    def once(
        self,
        principal: str,
        key: str | None,
        fingerprint: str,
        record: dict[str, Any],
        run: Callable[[dict[str, Any]], Answer],
        replay: Callable[[dict[str, Any]], Answer],
    ) -> Answer:
        """``run(record)`` once per (principal, key); a repeat gets ``replay(stored record)``.

        ``record`` (the ids the request will create) is stored before ``run`` so that two
        concurrent repeats cannot both run; ``run`` may change it (a submission that joined
        identical work answers that job), and the changed record is what repeats get. When
        ``run`` raises, the key is released: the request may be sent again.
        """
        if not key:
            return run(record)
        name = self.keys.idempotency(principal, key)
        record = {**record, "fingerprint": fingerprint}
        claimed = json.dumps(record)  # a snapshot: ``run`` may change the record in place
        while True:
            stored = self._stored(name, fingerprint)
            if stored is not None:
                return replay(stored)
            if self.redis.set(name, claimed, nx=True, ex=self.retention_seconds):
                break
            # Another request with this key claimed it between the read and the write:
            # this one is its repeat.
        try:
            answer = run(record)
        except BaseException:
            self._release(name, claimed)
            raise
        answered = json.dumps(record)
        if answered != claimed:
            self.redis.set(name, answered, xx=True, ex=self.retention_seconds)
        return answer

    def _stored(self, name: str, fingerprint: str) -> dict[str, Any] | None:
        raw = self.redis.get(name)
        if raw is None:
            return None
        stored: dict[str, Any] = json.loads(raw)
        if stored["fingerprint"] != fingerprint:
            raise InvalidInputError(
                "this Idempotency-Key was already used for a different request; "
                "use a new key for a new request",
                details={"field": "Idempotency-Key"},
            )
        return stored

    def _release(self, name: str, claimed: str) -> None:
        """Delete the key if it still holds this request's claim."""
        raw = self.redis.get(name)
        if raw is not None and (raw.decode() if isinstance(raw, bytes) else raw) == claimed:
            self.redis.delete(name)
