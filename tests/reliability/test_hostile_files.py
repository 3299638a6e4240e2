"""Hostile files straight to the worker: each ends as a FAILURE that says why (or, where the
file is merely odd, a success that says what it found), fast, on the first attempt; the
worker survives every one (no pool process lost), its memory stays bounded, and normal
jobs submitted in between succeed. The same files over HTTP: test_api_hostile.py.

Also direct Celery messages no API would send (extending test_celery.py's file outside the
allowed roots): ``../`` escaping the roots, a NUL byte, a symlink inside the upload
directory pointing outside it, a list where a path belongs, an unknown argument.
"""

from __future__ import annotations

import time
from pathlib import Path

from morag.core.config import settings
from morag.services.jobs import TaskStatus, get_job_store
from tests.reliability.hostile_inputs import FILE_CASES
from tests.reliability.support import RssSampler, Tally, audit, wait_all_final

TASKS = {
    "document": "morag.tasks.document_tasks.process_document_task",
    "audio": "morag.tasks.audio_tasks.process_audio_task",
    "video": "morag.tasks.video_tasks.process_video_task",
}
QUEUES = {kind: f"{kind}_processing" for kind in TASKS}


def test_hostile_files_fail_clearly_and_the_worker_survives(
    workers, submitter, report, upload_dir: Path, tmp_path: Path
) -> None:
    worker = workers.start(concurrency=2)  # every queue
    store = get_job_store(settings)
    cases, normal = {}, []
    with RssSampler() as rss:
        rss.watch("worker", worker.pid)
        rss.sample()
        start_mib = rss.peak_mib()["worker"]
        for n, case in enumerate(FILE_CASES):
            path = case.make(upload_dir / f"{n}-{case.filename}")
            task_id = submitter.submit(
                TASKS[case.kind],
                kind=case.kind,
                queue=QUEUES[case.kind],
                kwargs={"file_path": str(path), "metadata": {"filename": case.filename}},
            )
            cases[task_id] = case
            note = upload_dir / f"note-{n}.md"
            note.write_text(f"# Note {n}\n\nAn ordinary document between hostile ones.\n")
            normal.append(
                submitter.submit(
                    TASKS["document"],
                    kind="document",
                    queue=QUEUES["document"],
                    kwargs={"file_path": str(note)},
                )
            )
        secret = tmp_path / "secret.txt"
        secret.write_text("outside the allowed roots")
        link = upload_dir / "innocent.txt"
        link.unlink(missing_ok=True)
        link.symlink_to(secret)
        messages = {
            "path-escape": {"file_path": str(upload_dir / ".." / ".." / ".." / "etc" / "passwd")},
            "nul-in-path": {"file_path": str(upload_dir / "a\x00b.txt")},
            "symlink-escape": {"file_path": str(link)},
            "path-is-a-list": {"file_path": [str(link)]},
            "unknown-argument": {"file_path": str(upload_dir / "note-0.md"), "shell": "rm -rf /"},
        }
        path_ids = {
            name: submitter.submit(
                TASKS["document"], kind="document", queue=QUEUES["document"], kwargs=kwargs
            )
            for name, kwargs in messages.items()
        }  # fmt: skip
        ids = [*cases, *normal, *path_ids.values()]
        records = wait_all_final(store, ids, timeout=180)

    tally: Tally = audit("hostile-files/worker", store, ids, records)
    outcomes = {}
    wrong = []
    for task_id, case in cases.items():
        info = records[task_id]
        seconds = (info.finished_at - info.started_at).total_seconds() if info.started_at else 0
        outcomes[case.name] = f"{info.status.value}:{info.error_type or ''} {seconds:.2f}s"
        if case.errors:
            ok = info.status is TaskStatus.FAILURE and info.error_type in case.errors
            ok = ok and case.says in (info.error or "") and "Traceback" not in (info.error or "")
        else:
            markdown = (store.result(task_id) or {}).get("markdown", "")
            ok = info.status is TaskStatus.SUCCESS and case.says in markdown
        if not ok or info.attempts != 1 or seconds > case.max_seconds:
            wrong.append((case.name, info.status.value, info.error_type, info.error, seconds))
    for name, task_id in path_ids.items():
        info = records[task_id]
        outcomes[name] = f"{info.status.value}:{info.error_type}"
        # a signature mismatch is a TypeError the task reports as an unexpected error
        allowed = (
            ("TypeError",)
            if name == "unknown-argument"
            else ("ForbiddenTargetError", "InvalidInputError")
        )
        if info.status is not TaskStatus.FAILURE or info.error_type not in allowed:
            wrong.append((name, info.status.value, info.error_type, info.error))
    log = worker.log()
    lost_children = sum(log.count(s) for s in ("WorkerLostError", "exited prematurely"))
    report.record(
        tally,
        outcomes=outcomes,
        worker_rss_start_mib=start_mib,
        worker_rss_peak_mib=rss.peak_mib()["worker"],
        pool_processes_lost=lost_children,
    )
    assert not wrong, wrong
    assert all(records[i].status is TaskStatus.SUCCESS for i in normal)
    assert tally.lost == 0 and tally.duplicated == 0, tally.problems
    assert worker.alive() and lost_children == 0, log[-3000:]
    assert rss.peak_mib()["worker"] < start_mib + 600  # a 500 MB bomb was never inflated
    # The worker still takes work after all that.
    follow = upload_dir / "after.md"
    follow.write_text("# After\n\nStill working.\n")
    after = submitter.submit(
        TASKS["document"], kind="document", queue=QUEUES["document"],
        kwargs={"file_path": str(follow)},
    )  # fmt: skip
    started = time.monotonic()
    assert wait_all_final(store, [after], 30)[after].status is TaskStatus.SUCCESS
    assert time.monotonic() - started < 30
