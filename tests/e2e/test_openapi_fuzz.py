"""schemathesis against the live API's OpenAPI document: no 5xx, and every response (status
code, content type, headers, body) as the document describes it.

Bounded: 25 examples per operation and a fixed seed. No worker runs, so the jobs the fuzzer
creates stay queued and no URL it submits is ever fetched. The event stream of a real job
stays open until the job ends, so that operation is fuzzed only with made-up ids (the
examples and coverage phases); tests/e2e/test_api.py follows real streams.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.fuzzing import schemathesis_command


def test_openapi_fuzz(api_factory, tmp_path: Path) -> None:
    api = api_factory.start()
    command = schemathesis_command(
        api.url, tmp_path, max_examples=25, seed=20240601, request_timeout=10
    )
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    elapsed = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:] + "\n--- API log ---\n" + api.log()[-3000:]
    assert " passed" in output and "failures" not in output.split("SUMMARY")[-1].lower()
    assert elapsed < 120, f"the fuzz run took {elapsed:.0f} s"
