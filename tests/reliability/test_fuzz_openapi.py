"""schemathesis over the whole OpenAPI document with a larger budget (``-m slow`` only).

The default run has a bounded fuzz (tests/e2e/test_openapi_fuzz.py: 25 examples per
operation, one seed). This one runs 300 examples per operation, with every phase
(examples, coverage, fuzzing, stateful links), under two seeds, against an API with API
keys on, so the authenticated and the refused paths are both explored: no 5xx, and every
response (status, content type, headers, body) as the document describes it. No worker
runs: jobs the fuzzer creates stay queued and no URL it submits is fetched.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.fuzzing import schemathesis_command
from tests.reliability.support import Tally

API_KEY = "fuzz-key-0123456789"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", [7, 20240601])
def test_openapi_fuzz_large_budget(api_process, tmp_path: Path, report, seed: int) -> None:
    base, api = api_process(api_keys=API_KEY)
    command = schemathesis_command(
        base,
        tmp_path,
        max_examples=300,
        seed=seed,
        request_timeout=20,
        headers=(f"X-API-Key: {API_KEY}",),
    )
    started = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=1700, check=False)
    elapsed = time.monotonic() - started
    output = run.stdout + run.stderr
    summary = output.split("SUMMARY")[-1]
    report.record(
        Tally(f"fuzz/openapi/seed-{seed}"),
        seconds=round(elapsed),
        summary=" ".join(line.strip() for line in summary.splitlines() if line.strip())[:400],
    )
    assert run.returncode == 0, output[-8000:] + "\n--- API log ---\n" + api.log()[-3000:]
    assert api.alive()
