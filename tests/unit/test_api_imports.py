"""The API process must not load what only workers need (speech models, media and document
libraries): it starts fast and stays small."""

from __future__ import annotations

import subprocess
import sys

HEAVY = (
    "trafilatura",
    "faster_whisper",
    "ctranslate2",
    "av",
    "markitdown",
    "pypdf",
    "tokenizers",
    "semchunk",
    "numpy",
    "morag.processors.document",
    "morag.processors.audio",
    "morag.processors.video",
    "morag.processors.web",
    "morag.processors.chunking",
)


def test_the_api_and_its_type_detection_import_no_worker_libraries() -> None:
    code = (
        "import sys, morag.api.main, morag.processors.detect\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
