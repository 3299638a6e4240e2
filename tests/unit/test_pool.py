"""A recycled pool process waits for the main process to read its results before it
leaves (so none is lost), looking after 1 ms rather than billiard's 0.1 s (tasks/pool.py)."""

from __future__ import annotations

import pytest

from morag.tasks import pool


class ReadCounter:
    """billiard's shared counter of results read, as the leaving process sees it."""

    def __init__(self, values: list[int]) -> None:
        self.values = values

    @property
    def value(self) -> int:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def leaving_process(counter: ReadCounter) -> pool.Worker:
    worker = object.__new__(pool.Worker)  # its loop's state only: no pipes, no fork
    worker.on_ready_counter = counter
    return worker


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits the process sleeps, on a clock that moves only by them."""
    waits: list[float] = []
    monkeypatch.setattr(pool.time, "sleep", waits.append)
    monkeypatch.setattr(pool.time, "monotonic", lambda: sum(waits))
    return waits


def test_a_leaving_process_looks_after_1_ms_then_at_doubling_intervals(clock) -> None:
    counter = ReadCounter([7] * 9 + [10])  # the main process reads the last 3 results late
    assert leaving_process(counter)._ensure_messages_consumed(10) is True
    assert clock == [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.1, 0.1]


def test_a_process_whose_results_were_read_leaves_without_waiting(clock) -> None:
    assert leaving_process(ReadCounter([1000]))._ensure_messages_consumed(1000) is True
    assert clock == []


def test_a_process_gives_up_after_billiards_30_s(clock) -> None:
    assert leaving_process(ReadCounter([999]))._ensure_messages_consumed(1000) is False
    assert 30.0 <= sum(clock) <= 30.2
    assert max(clock) == 0.1  # billiard's interval, never longer


def test_the_configured_pool_lets_deliveries_carry_the_acks() -> None:
    """A delivery's bookkeeping carries the acks before it only when the pool acks in the
    event loop's thread (``DeferredAcks``, tasks/lifecycle.py): the pool morag configures
    is such a pool; a thread pool is not."""
    from celery.concurrency import get_implementation

    from morag.core.celery_app import celery_app
    from morag.tasks.lifecycle import DeferredAcks

    configured = get_implementation(celery_app.conf.worker_pool)
    assert configured is pool.TaskPool
    assert DeferredAcks.acks_in_the_loop(object.__new__(configured))
    assert DeferredAcks.acks_in_the_loop(object.__new__(get_implementation("solo")))
    assert not DeferredAcks.acks_in_the_loop(object.__new__(get_implementation("threads")))
