"""Keeping ``morag up``'s children running: the embedded Redis and index, the worker and
the API.

A child that exits while ``up`` is not stopping is started again after a backoff that
doubles with each recent restart (1 s, 2 s, 4 s ... capped). More than ``limit`` restarts
within ``window`` seconds is a crash loop: ``up`` stops everything and exits non-zero,
naming the child, rather than restarting something that cannot run. A child that stayed
up for longer than the window has no restart left in it, so its count and its backoff
start again (the rule of systemd's StartLimitBurst/StartLimitIntervalSec).

Why restart rather than stop everything: a worker can die without being at fault (an OOM
kill; a library crash such as Celery 5.7's when Redis went away, docs/reliability.md), and
nothing is lost when it does (its jobs come back through services/recovery.py once a worker
runs again); stopping the API with it would turn one dead process into an outage.

The embedded Redis is restarted under the same rules, on the same data directory (AOF) and
the same unix socket, so the URL the worker and the API hold stays valid and they reconnect
on their own; the recovery loop republishes what a crash lost (it notices the new run_id).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from morag.core.embedded_postgres import EmbeddedPostgres
from morag.core.embedded_redis import EmbeddedRedis, _die_with_parent
from morag.core.errors import ConfigurationError

EXIT_CRASH_LOOP = 1  # ``morag up``'s exit code when it gave up on a child


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a child, and when to give up on it."""

    backoff: float = 1.0  # seconds before the first restart; doubles with each recent one
    backoff_max: float = 30.0
    limit: int = 5  # restarts allowed within ``window``; one more is a crash loop
    window: float = 60.0


class RestartHistory:
    """One child's exits within the last ``window`` seconds; pure (the caller passes the
    time). A child that ran for longer than the window has none left, so its next restart
    is a first one again (shortest backoff, count 1)."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._exits: deque[float] = deque()

    def record_exit(self, now: float) -> float | None:
        """Count an exit at ``now``: the delay before the restart, or None (crash loop)."""
        while self._exits and self._exits[0] <= now - self.policy.window:
            self._exits.popleft()
        self._exits.append(now)
        recent = len(self._exits)
        if recent > self.policy.limit:
            return None
        return float(min(self.policy.backoff * 2 ** (recent - 1), self.policy.backoff_max))

    @property
    def recent(self) -> int:
        """Exits counted in the window at the last ``record_exit``."""
        return len(self._exits)


class Child(Protocol):
    """A process ``morag up`` runs and may restart."""

    name: str
    log_hint: str  # where the user finds out why it exited

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def poll(self) -> int | None:
        """None while running, else the exit code (negative: killed by that signal)."""

    def stop(self) -> None: ...


class ChildProcess:
    """A command run in a session of its own (``up`` runs ``python -m morag.cli worker``
    and ``... api``)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        stop_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.stop_timeout = stop_timeout
        self.log_hint = f"the {name}'s messages above (morag up passes on its output)"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        # Own session: Ctrl-C reaches only ``up``, which stops the children in order; and
        # its process group holds a worker's pool processes, to be killed with it.
        self.process = subprocess.Popen(
            self.argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent
        )

    def poll(self) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            if not self._exited():
                return None
            # A worker killed alone (OOM) leaves pool processes that hold memory and jobs.
            # Not reaped yet, the child's pid cannot be reused, so its group is still its own.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()

    def stop(self) -> None:
        """SIGTERM (a worker's warm shutdown), then SIGKILL to the group; an unfinished
        job stays unacked and is delivered again by the next worker's recovery."""
        if self.process is None or self.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                _log(f"{self.name} did not stop in {self.stop_timeout:g} s; killing it")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
                return
            time.sleep(0.05)

    def _exited(self) -> bool:
        """Whether the child exited, without reaping it (so its pid stays taken)."""
        assert self.process is not None
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        try:
            return os.waitid(os.P_PID, self.process.pid, flags) is not None
        except ChildProcessError:  # reaped already
            return True


class EmbeddedRedisProcess:
    """The embedded ``redis-server``, restarted on the same data dir and socket."""

    name = "redis"

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server
        self.log_hint = str(server.data_dir / "redis.log")

    @property
    def pid(self) -> int | None:
        return self.server.process.pid if self.server.process is not None else None

    def start(self) -> None:
        self.server.start()

    def poll(self) -> int | None:
        return self.server.process.poll() if self.server.process is not None else None

    def stop(self) -> None:
        self.server.stop()


class EmbeddedIndexProcess:
    """The embedded PostgreSQL (the index), restarted on the same data dir and socket:
    its WAL brings back every committed write, and jobs whose write it interrupted wait
    for it and write again (tasks/indexing.py)."""

    name = "index"

    def __init__(self, server: EmbeddedPostgres) -> None:
        self.server = server
        self.log_hint = str(server.log_path)

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def start(self) -> None:
        self.server.start()

    def poll(self) -> int | None:
        return self.server.process.poll() if self.server.process is not None else None

    def stop(self) -> None:
        self.server.stop()


@dataclass
class _Supervised:
    child: Child
    history: RestartHistory
    started_at: float = 0.0
    restart_at: float | None = None  # set while waiting out a backoff
    starts: int = 0


def describe_exit(code: int) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _log(message: str) -> None:
    print(f"morag: {message}", file=sys.stderr, flush=True)


@dataclass
class Supervisor:
    """Starts the children in order, restarts one that exits (``RestartPolicy``), and
    stops them in reverse order once ``request_stop`` was called or a child crash-loops.

    ``run`` blocks; a signal handler calls ``request_stop``, which ``run`` notices within
    ``poll_interval``, also during a backoff wait. Nothing is restarted once stopping.
    """

    children: Sequence[Child]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    log: Callable[[str], None] = _log
    clock: Callable[[], float] = time.monotonic
    poll_interval: float = 0.1
    stopping: bool = False

    def __post_init__(self) -> None:
        self._supervised = [_Supervised(c, RestartHistory(self.policy)) for c in self.children]

    def request_stop(self) -> None:
        self.stopping = True

    def run(self) -> int:
        """Start, supervise, stop; 0 after a requested stop, EXIT_CRASH_LOOP after giving up.
        A child that cannot start the first time raises (ConfigurationError, OSError)
        once the ones already started were stopped."""
        try:
            for entry in self._supervised:
                if self.stopping:
                    return 0
                self._start(entry, first=True)
            while not self.stopping:
                for entry in self._supervised:
                    if not self.stopping and not self._supervise(entry):
                        return EXIT_CRASH_LOOP
                time.sleep(self.poll_interval)
            return 0
        finally:
            self.stopping = True
            # the API, the worker, then the index and Redis
            for entry in reversed(self._supervised):
                entry.child.stop()

    def starts(self, name: str) -> int:
        """How many times the child called ``name`` was started."""
        return next(e.starts for e in self._supervised if e.child.name == name)

    def _start(self, entry: _Supervised, first: bool = False) -> bool:
        entry.restart_at = None
        entry.started_at = self.clock()
        entry.starts += 1
        try:
            entry.child.start()
        except (ConfigurationError, OSError) as exc:
            if first:
                raise
            # its process is gone, so the next look counts this as an exit
            self.log(f"{entry.child.name} did not start again: {exc}")
            return False
        return True

    def _supervise(self, entry: _Supervised) -> bool:
        """Restart ``entry`` when due; False when it crash-loops."""
        now = self.clock()
        child = entry.child
        if entry.restart_at is not None:
            if now >= entry.restart_at and self._start(entry):
                self.log(f"{child.name} restarted (pid {child.pid})")
            return True
        code = child.poll()
        if code is None:
            return True
        ran = now - entry.started_at
        delay = entry.history.record_exit(now)
        at = datetime.now().strftime("%H:%M:%S")
        if delay is None:
            self.log(
                f"{child.name} (pid {child.pid}) {describe_exit(code)} at {at}, "
                f"{entry.history.recent} exits within {self.policy.window:g} s (at most "
                f"{self.policy.limit} restarts allowed): it keeps failing, so morag stops "
                f"everything. Look at {child.log_hint} to see why it fails."
            )
            return False
        entry.restart_at = now + delay
        self.log(
            f"{child.name} (pid {child.pid}) {describe_exit(code)} at {at} after "
            f"{ran:.1f} s; restarting it in {delay:g} s "
            f"(restart {entry.history.recent} of at most {self.policy.limit} within "
            f"{self.policy.window:g} s)"
        )
        return True
