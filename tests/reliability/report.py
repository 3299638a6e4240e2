"""The figures of a reliability run (no morag imports: loaded by conftest early)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


class Report:
    """Figures of this run, printed at the end and optionally written as JSON."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def record(self, tally: Any, **figures: Any) -> None:
        """Keep a scenario's Tally (see support.py) with extra figures."""
        tally.figures.update(figures)
        self.entries.append({**asdict(tally), "problems": tally.problems[:20]})

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.entries, indent=2, default=str))
