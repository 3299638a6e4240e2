"""The worker's pool in a real event loop, its processes really forked (tasks/pool.py):
each turn of the loop touches only the pipes it holds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kombu.asynchronous import Hub

from morag.tasks.pool import AsynPool


@pytest.fixture
def pool_in_loop() -> Iterator[tuple[AsynPool, Hub, list[int]]]:
    """A pool of two processes, both up, registered with a loop; the fds the loop's
    poller was asked to drop."""
    pool = AsynPool(processes=2, threads=False, synack=False)
    hub = Hub()
    try:
        pool.register_with_event_loop(hub)
        turns = hub.create_loop()
        deadline = time.monotonic() + 30
        while len(pool._all_inqueues) < 2:  # each process says it is up through the loop
            assert time.monotonic() < deadline, "pool processes did not start"
            next(turns)
        dropped: list[int] = []
        unregister = hub.poller.unregister

        def recording_unregister(fd: Any) -> None:
            dropped.append(fd)
            unregister(fd)

        hub.poller.unregister = recording_unregister
        yield pool, hub, dropped
    finally:
        pool.terminate()
        hub.close()


def test_an_idle_pools_poll_start_leaves_the_loop_alone(pool_in_loop) -> None:
    """Celery's asked the poller to drop every idle process's pipe on every turn."""
    pool, hub, dropped = pool_in_loop
    for _ in range(3):
        pool.on_poll_start()
    assert dropped == [] and not set(hub.writers) & pool._all_inqueues


def test_a_pipe_the_loop_writes_to_is_removed_once_its_process_is_idle(pool_in_loop) -> None:
    pool, hub, dropped = pool_in_loop
    fd = next(iter(pool._all_inqueues))
    hub.add_writer(fd, lambda: None)
    pool.on_poll_start()
    assert fd not in hub.writers and dropped == [fd]


def test_a_waiting_message_puts_the_idle_processes_pipes_in_the_loop(pool_in_loop) -> None:
    """Celery's own poll start, unchanged: the loop then says which pipe can take it."""
    pool, hub, _ = pool_in_loop
    pool.outbound_buffer.append(object())
    try:
        pool.on_poll_start()
        assert pool._all_inqueues <= set(hub.writers) and pool._all_inqueues <= hub.consolidate
    finally:
        pool.outbound_buffer.clear()
    pool.on_poll_start()
    assert not set(hub.writers) & pool._all_inqueues
