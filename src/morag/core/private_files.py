"""What morag stores is private: uploads are users' documents, and the embedded Redis's
AOF and RDB files hold every result. Every process that writes under the data directory
(``morag up`` and the Redis it starts, workers, the API) calls ``keep_files_private`` at
start-up: files it creates are 0600 and directories 0700, and the data directory tree is
made (or tightened) 0700.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:  # importing config builds the process's settings: not at import time here
    from morag.core.config import Settings

logger = structlog.get_logger(__name__)

PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700


def keep_files_private(cfg: Settings) -> None:
    """Set this process's umask (children inherit it) and make the data directories 0700."""
    os.umask(PRIVATE_UMASK)
    assert cfg.upload_dir is not None and cfg.artifact_dir is not None
    for directory in (cfg.data_dir, cfg.upload_dir, cfg.artifact_dir):
        private_directory(directory)


def private_directory(path: Path) -> Path:
    """Create ``path`` (and its parents) 0700; tighten it if it exists with a wider mode.

    A directory created by an older version, or by hand, may be 0755: its files were then
    readable by every local user. One that is not ours (shared storage) is left as it is.
    """
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o777 != PRIVATE_DIR_MODE:
            path.chmod(PRIVATE_DIR_MODE)
    except PermissionError:
        logger.warning("directory left as it is: not ours to tighten", path=str(path))
    return path
