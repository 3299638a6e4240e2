"""The schemathesis run both fuzz tests make (tests/e2e, bounded; tests/reliability,
``-m slow``, a larger budget): one configuration, one set of checks."""

from __future__ import annotations

import sys
from pathlib import Path

# A live job's event stream stays open until the job ends: made-up ids only there.
_CONFIG = """
[[operations]]
include-path = "/api/v1/status/{task_id}/events"
phases.fuzzing.enabled = false
phases.stateful.enabled = false
"""

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)


def schemathesis_command(
    base_url: str,
    work_dir: Path,
    *,
    max_examples: int,
    seed: int,
    request_timeout: int,
    headers: tuple[str, ...] = (),
) -> list[str]:
    """``schemathesis run`` over the API's OpenAPI document; config and report in
    ``work_dir``. /health/ready is left out: it answers 503 by design while no worker runs
    (none does in these tests)."""
    config = work_dir / "schemathesis.toml"
    config.write_text(_CONFIG)
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(config),
        "run",
        f"{base_url}/openapi.json",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--checks",
        CHECKS,
        "--request-timeout",
        str(request_timeout),
        "--no-color",
        "--exclude-path",
        "/health/ready",
        "--report-dir",
        str(work_dir / "report"),
    ]
    for header in headers:
        command += ["--header", header]
    return command
