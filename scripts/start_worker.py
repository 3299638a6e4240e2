#!/usr/bin/env python3
"""Start a Celery worker for all five queues (the seed's script; ``morag worker`` is the same)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "src"))

from morag.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["worker", *sys.argv[1:]])
