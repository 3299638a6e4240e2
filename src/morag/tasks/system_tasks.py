"""Diagnostic task on the default ``celery`` queue.

``probe`` exercises the whole job machinery (record, progress, cancellation, recovery)
without processing anything: ``morag`` uses it for self-tests and benchmarks of the
task layer. Fault injection (``crash``) works only when ``MORAG_ENABLE_FAULT_INJECTION``
is on, so a production broker message cannot kill workers on purpose.
"""

from __future__ import annotations

import os
import time
from typing import Any

from morag.core.config import settings
from morag.core.errors import InvalidInputError, TransientError
from morag.tasks.processing import ProcessingTask, processing_task


@processing_task("system")
def probe(
    self: ProcessingTask,
    steps: int = 0,
    step_seconds: float = 0.0,
    fault: str = "",
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run ``steps`` steps of ``step_seconds`` each, reporting progress after each."""
    if fault and not settings.enable_fault_injection:
        raise InvalidInputError("fault injection is disabled on this worker")
    if fault == "crash":
        os._exit(1)  # the process dies as if SIGKILLed mid-job
    if fault == "transient":
        raise TransientError("injected transient failure")
    if fault == "error":
        raise ValueError("injected error")
    for step in range(steps):
        if step_seconds:
            time.sleep(step_seconds)
        self.update_progress(
            (step + 1) / steps, f"step {step + 1} of {steps}", stage="probing", step=step + 1
        )
    return {"steps": steps, "step_seconds": step_seconds, "pid": os.getpid()}
