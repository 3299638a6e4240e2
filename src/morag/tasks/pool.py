"""The worker's pool: Celery's prefork pool, replacing a leaving process at once.

A pool process leaves after ``worker_max_tasks_per_child`` jobs (the seed's 1,000), when
``revoke(terminate=True)`` kills it, or when it dies. Three waits left its slot empty:

- Before a recycled process leaves, billiard makes it wait until the main process has
  read its last result, looking every 0.1 s. The main process has rarely read it at the
  first look, so the slot stood empty 100 ms a recycle. Here the process looks after
  1 ms, then at doubling intervals up to billiard's 0.1 s, within billiard's 30 s.
- Celery's pool notices the exit as the process's sentinel pipe closes, a moment before
  the kernel lets it be reaped, and replaces it only if it can be reaped then; otherwise
  at its next maintenance, every 5 s (celery/celery#9588). Here the exit is looked at
  again every millisecond until the process is reaped and replaced, and the pool also
  looks for exited processes ten times a second.
- Cleaning up after it, the main process waited 10 ms for results a dead process could
  no longer send, its event loop (every other slot's deliveries and results) stopped
  meanwhile. Here what a dead process sent is read without waiting.

From a recycled process's last job to its replacement's first, the slot is now empty
about 20 ms (its exit, the fork and the new process's start), where it was 120 ms.

Celery's pool also starts every turn of the worker's event loop by removing each idle
process's pipe from the loop's writers, whether it is there or not: an ``epoll_ctl`` that
fails and is ignored, per process and per turn, in the main process that sets the pace
of short jobs. Here only the pipes the loop holds are removed.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from billiard import pool as billiard_pool
from billiard.util import warning
from celery import signals
from celery.concurrency import asynpool, prefork

#: Seconds between two looks for exited pool processes (Celery's own: 5).
POOL_MAINTENANCE_SECONDS = 0.1

#: Seconds between two looks at a process whose exit was noticed before it was reapable.
REAP_RETRY_SECONDS = 0.001

#: Looks at such a process before leaving it to the periodic maintenance.
REAP_RETRIES = 100

#: First wait of a recycled process for the main process to read its last result.
CONSUMED_FIRST_WAIT_SECONDS = 0.001
#: Its longest wait and how many of those it may wait (billiard's: 0.1 s, 300 of them).
CONSUMED_LAST_WAIT_SECONDS = billiard_pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_INTERVAL
CONSUMED_WAITS = billiard_pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT


class Worker(asynpool.Worker):  # type: ignore[misc]
    """A pool process (its loop runs in the child)."""

    def _ensure_messages_consumed(self, completed: int) -> bool:
        """Wait until the main process has read all ``completed`` results, as billiard
        does (so none is lost with the process), looking sooner than its 0.1 s."""
        if not self.on_ready_counter:
            return False
        wait = CONSUMED_FIRST_WAIT_SECONDS
        deadline = time.monotonic() + CONSUMED_LAST_WAIT_SECONDS * CONSUMED_WAITS  # 30 s
        while self.on_ready_counter.value < completed:
            if time.monotonic() > deadline:
                warning("could not ensure all messages were consumed prior to exiting")
                return False
            time.sleep(wait)
            wait = min(wait * 2, CONSUMED_LAST_WAIT_SECONDS)
        return True


class AsynPool(asynpool.AsynPool):  # type: ignore[misc]
    Worker = Worker

    def _create_worker_process(self, i: int) -> Any:
        """Celery's, freezing the collector's objects before the fork where Celery collected
        them (celery/celery#2927): a full collection cost the main process 5 ms a recycle,
        and its later ones wrote to every page they scanned, each then copied away from the
        new process. Python's documentation advises freezing before a fork; the young
        generation is collected first, so fresh cyclic garbage is not kept for good."""
        signals.worker_before_create_process.send(sender=self)
        gc.collect(0)
        gc.freeze()
        return billiard_pool.Pool._create_worker_process(self, i)

    def _create_write_handlers(self, hub: Any, *args: Any, **kwargs: Any) -> None:
        """Celery's, its poll start removing from the loop's writers only the idle
        processes' pipes that are there (see the module docstring)."""
        super()._create_write_handlers(hub, *args, **kwargs)
        celerys: Callable[[], None] = self.on_poll_start  # type: ignore[has-type]
        outbound, busy = self.outbound_buffer, self._busy_workers
        inqueues, writing = self._all_inqueues, self._active_writes
        writers, remove_writer = hub.writers, hub.remove_writer
        fair = self.sched_strategy == asynpool.SCHED_STRATEGY_FAIR

        def on_poll_start() -> None:
            if outbound and (not fair or len(busy) < len(inqueues)):
                celerys()  # a message waits for a free process: Celery's adds the writers
                return
            for fd in inqueues:  # removing a writer leaves the set of pipes as it is
                if fd in writers and fd not in writing:
                    remove_writer(fd)

        self.on_poll_start = on_poll_start

    @property
    def timers(self) -> dict[Any, float]:
        return {self.maintain_pool: POOL_MAINTENANCE_SECONDS}

    def _event_process_exit(self, hub: Any, proc: Any) -> None:
        super()._event_process_exit(hub, proc)
        self._reap_soon(hub, proc, REAP_RETRIES)

    def _reap_soon(self, hub: Any, proc: Any, retries: int) -> None:
        if proc in self._pool and retries > 0:  # not reaped yet: it is still exiting
            hub.call_later(REAP_RETRY_SECONDS, self._reap_again, hub, proc, retries - 1)

    def _reap_again(self, hub: Any, proc: Any, retries: int) -> None:
        self.maintain_pool()
        self._reap_soon(hub, proc, retries)

    def process_flush_queues(self, proc: Any) -> None:
        """Hand on the results ``proc`` sent; for a process that exited, without waiting
        for more (Celery's waits 10 ms for the next one)."""
        if proc.exitcode is None:
            super().process_flush_queues(proc)
            return
        reader = proc.outq._reader
        on_state_change = self._result_handler.on_state_change
        while not reader.closed and self._state != asynpool.TERMINATE and reader.poll(0):
            try:
                message = reader.recv()
            except (OSError, EOFError):
                break  # a message cut short by its death, or the end of the pipe
            if message is None:
                break
            on_state_change(message)


class TaskPool(prefork.TaskPool):  # type: ignore[misc]
    """``worker_pool`` of morag's Celery app (core/celery_app.py)."""

    Pool = AsynPool
