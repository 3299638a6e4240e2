"""How many event streams one API process holds at once: per owner, and in all.

Counted in the process (not in Redis): a stream holds a socket and memory of this
process, and a process that dies frees its slots with it.
"""

from __future__ import annotations

from collections import Counter

from morag.core.errors import OverloadedError, TooManyRequestsError

#: Seconds a refused client is told to wait (Retry-After): streams free their slots as
#: jobs end, or at the latest after the maximum duration.
RETRY_AFTER_SECONDS = 5


class StreamSlot:
    """One held stream; ``release`` gives the slot back (once, however often called)."""

    __slots__ = ("_slots", "owner")

    def __init__(self, slots: StreamSlots, owner: str) -> None:
        self._slots: StreamSlots | None = slots
        self.owner = owner

    def release(self) -> None:
        if self._slots is not None:
            self._slots._release(self.owner)
            self._slots = None


class StreamSlots:
    def __init__(self, per_owner: int, total: int) -> None:
        self.per_owner = per_owner
        self.total = total
        self._held: Counter[str] = Counter()
        self._count = 0

    def acquire(self, owner: str) -> StreamSlot:
        """A slot for ``owner``'s new stream: 429 when the owner holds ``per_owner``
        streams already, 503 when the process holds ``total``."""
        if self._held[owner] >= self.per_owner:
            raise TooManyRequestsError(
                f"this client already follows {self.per_owner} event streams on this "
                "server, the most it may; close one, or poll the job's status",
                details={"limit": self.per_owner},
                retry_after=RETRY_AFTER_SECONDS,
            )
        if self._count >= self.total:
            raise OverloadedError(
                f"this server already holds {self.total} event streams, the most it "
                "takes; retry later, or poll the job's status",
                details={"limit": self.total},
                retry_after=RETRY_AFTER_SECONDS,
            )
        self._held[owner] += 1
        self._count += 1
        return StreamSlot(self, owner)

    def held(self, owner: str | None = None) -> int:
        """Streams held by ``owner``, or by everyone."""
        return self._count if owner is None else self._held[owner]

    def _release(self, owner: str) -> None:
        self._count -= 1
        self._held[owner] -= 1
        if self._held[owner] <= 0:
            del self._held[owner]
