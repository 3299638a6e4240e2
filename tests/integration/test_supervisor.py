"""The supervisor of ``morag up`` (core/supervisor.py) with real, tiny child processes:
restarts with backoff, giving up on a crash loop, a prompt stop during a backoff, the
stop order, and a killed child's leftover processes. ``morag up`` itself is in
tests/e2e/test_up_supervision.py."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from morag.core.supervisor import (
    EXIT_CRASH_LOOP,
    ChildProcess,
    RestartPolicy,
    Supervisor,
)
from tests.harness import wait_for

FAST = RestartPolicy(backoff=0.05, backoff_max=1.0, limit=3, window=60.0)


def python(name: str, code: str) -> ChildProcess:
    return ChildProcess(name, [sys.executable, "-c", code], stop_timeout=5)


def sleeper(name: str) -> ChildProcess:
    return python(name, "import time; time.sleep(60)")


def run_with(supervisor: Supervisor, action: Callable[[], None] | None = None) -> int:
    """``supervisor.run()`` here (it forks children, which die with the forking thread)
    while ``action`` drives it from a thread; the action's failure is raised here."""
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            if action is not None:
                action()
        except BaseException as exc:
            errors.append(exc)
        finally:
            supervisor.request_stop()

    thread = threading.Thread(target=drive, daemon=True) if action else None
    if thread:
        thread.start()
    code = supervisor.run()
    if thread:
        thread.join(10)
    if errors:
        raise errors[0]
    return code


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie nobody reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def test_a_child_that_keeps_exiting_is_restarted_with_backoff_then_given_up_on() -> None:
    messages: list[str] = []
    steady = sleeper("steady")
    failing = python("failing", "import sys; sys.exit(3)")
    supervisor = Supervisor([steady, failing], FAST, log=messages.append, poll_interval=0.01)

    assert run_with(supervisor) == EXIT_CRASH_LOOP
    assert supervisor.starts("failing") == 4 and supervisor.starts("steady") == 1
    restarts = [m for m in messages if "restarting it in" in m]
    assert [m.split("restarting it in ")[1].split(" s")[0] for m in restarts] == [
        "0.05",
        "0.1",
        "0.2",
    ]
    assert all(m.startswith("failing (pid ") and "exited with code 3" in m for m in restarts)
    assert "restart 3 of at most 3 within 60 s" in restarts[-1]
    last = messages[-1]
    assert last.startswith("failing (pid ") and "4 exits within 60 s" in last, messages
    assert "keeps failing" in last and "Look at the failing's messages above" in last
    assert steady.poll() is not None  # the others were stopped


def test_a_stop_during_a_backoff_is_prompt_and_restarts_nothing() -> None:
    messages: list[str] = []
    failing = python("failing", "import sys; sys.exit(1)")
    supervisor = Supervisor(
        [sleeper("steady"), failing],
        RestartPolicy(backoff=60.0, backoff_max=60.0, limit=5, window=60.0),
        log=messages.append,
    )
    asked: list[float] = []

    def stop_while_waiting() -> None:
        wait_for(lambda: any("restarting it in 60 s" in m for m in messages), 10, "an exit")
        asked.append(time.monotonic())

    assert run_with(supervisor, stop_while_waiting) == 0
    assert time.monotonic() - asked[0] < 2.0  # the stop includes the sleeper's SIGTERM
    assert supervisor.starts("failing") == 1
    assert not any("restarted" in m for m in messages)


def test_children_stop_in_reverse_order(tmp_path: Path) -> None:
    stopped = tmp_path / "stopped"

    def recording(name: str) -> ChildProcess:
        ready = tmp_path / f"{name}.ready"
        return python(
            name,
            "import pathlib, signal, sys, time\n"
            "def on_term(*_):\n"
            f"    with open({str(stopped)!r}, 'a') as f: f.write({name!r} + '\\n')\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, on_term)\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "time.sleep(60)\n",
        )

    children = [recording(name) for name in ("redis", "worker", "api")]
    supervisor = Supervisor(children, FAST, log=lambda m: None)

    def when_all_ready() -> None:
        wait_for(lambda: len(list(tmp_path.glob("*.ready"))) == 3, 10, "three children")

    assert run_with(supervisor, when_all_ready) == 0
    assert stopped.read_text().split() == ["api", "worker", "redis"]


def test_a_child_killed_alone_loses_its_leftover_processes_and_comes_back(
    tmp_path: Path,
) -> None:
    """As when the OOM killer takes a worker's main process and leaves its pool."""
    messages: list[str] = []
    pids = tmp_path / "grandchild.pid"
    parent = python(
        "worker",
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'a').write(f'{{p.pid}}\\n')\n"
        "time.sleep(60)\n",
    )
    supervisor = Supervisor([parent], FAST, log=messages.append, poll_interval=0.01)
    seen: dict[str, int] = {}

    def kill_the_parent_only() -> None:
        wait_for(lambda: pids.exists() and pids.read_text().endswith("\n"), 10, "a grandchild")
        seen["grandchild"] = int(pids.read_text().split()[0])
        first_pid = parent.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: gone(seen["grandchild"]), 10, "the leftover to be killed")
        wait_for(lambda: supervisor.starts("worker") == 2, 10, "the restart")
        assert any(f"worker (pid {first_pid}) was killed by SIGKILL" in m for m in messages)
        wait_for(lambda: len(pids.read_text().split()) == 2, 10, "the new grandchild")
        seen["second"] = int(pids.read_text().split()[1])

    assert run_with(supervisor, kill_the_parent_only) == 0
    wait_for(lambda: gone(seen["second"]), 10, "stopping to kill the group as well")
