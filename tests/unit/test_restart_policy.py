"""``morag up``'s restart rules (core/supervisor.py): backoff, crash-loop bound, reset.
The time is passed in, so these run without a clock or a process."""

from __future__ import annotations

import signal

from morag.core.config import Settings
from morag.core.supervisor import RestartHistory, RestartPolicy, describe_exit

POLICY = RestartPolicy(backoff=1.0, backoff_max=30.0, limit=5, window=60.0)


def test_backoff_doubles_and_the_sixth_exit_within_the_window_is_a_crash_loop() -> None:
    history = RestartHistory(POLICY)
    now = 1000.0
    delays = []
    for _ in range(5):
        delay = history.record_exit(now)
        delays.append(delay)
        assert delay is not None
        now += delay + 0.5  # the child dies half a second after each restart
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert now - 1000.0 < POLICY.window  # all of them in one window
    assert history.record_exit(now) is None
    assert history.recent == 6


def test_backoff_is_capped() -> None:
    history = RestartHistory(RestartPolicy(backoff=1.0, backoff_max=5.0, limit=10, window=60.0))
    delays = [history.record_exit(float(t)) for t in range(6)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_exits_older_than_the_window_no_longer_count() -> None:
    history = RestartHistory(POLICY)
    for t in (0.0, 10.0, 20.0, 30.0, 40.0):
        assert history.record_exit(t) is not None
    # at 61 s the exit at 0 s has left the window: 5 exits in it, still allowed
    assert history.record_exit(61.0) == 16.0
    assert history.recent == 5
    # one more within the window is the sixth
    assert history.record_exit(62.0) is None


def test_a_child_that_ran_longer_than_the_window_starts_counting_again() -> None:
    history = RestartHistory(POLICY)
    now = 0.0
    for _ in range(4):  # a bad start-up: four quick exits
        delay = history.record_exit(now)
        assert delay is not None
        now += delay + 0.1
    assert history.recent == 4
    now += POLICY.window + 1  # then it ran for more than a minute
    assert history.record_exit(now) == POLICY.backoff  # shortest backoff again
    assert history.recent == 1


def test_a_slow_crash_is_restarted_for_ever() -> None:
    """A child that dies after running 20 s each time is working most of the time: at most
    three exits fall in any minute, so it is never given up on."""
    history = RestartHistory(POLICY)
    now = 0.0
    for _ in range(50):
        delay = history.record_exit(now)
        assert delay is not None and delay <= 4.0
        now += delay + 20.0


def test_limit_zero_gives_up_at_the_first_exit() -> None:
    assert RestartHistory(RestartPolicy(limit=0)).record_exit(0.0) is None


def test_the_defaults_are_settings() -> None:
    cfg = Settings(_env_file=None)
    assert (
        cfg.up_restart_backoff_seconds,
        cfg.up_restart_backoff_max_seconds,
        cfg.up_restart_limit,
        cfg.up_restart_window_seconds,
    ) == (POLICY.backoff, POLICY.backoff_max, POLICY.limit, POLICY.window)


def test_exit_descriptions() -> None:
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"
