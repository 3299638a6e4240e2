"""Two worker processes index at once into one embedded index, which is killed and started
again while jobs are in flight: every job succeeds, every document holds exactly its own
chunks (nothing lost, nothing doubled), and jobs did meet the outage (docs/search.md
"Waiting for the index")."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from morag.core.config import settings
from morag.core.embedded_postgres import EmbeddedPostgres
from morag.core.index_conn import connect
from morag.services.jobs import TaskStatus, get_job_store
from tests.harness import wait_for
from tests.reliability.support import audit, histories, wait_all_final

DOCUMENTS = 24


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_workers_index_through_a_restart_of_the_index(
    workers, submitter, upload_dir: Path, tmp_path: Path, report
) -> None:
    server = EmbeddedPostgres(tmp_path / "index")
    url = server.start()
    try:
        pair = [workers.start(queues="document_processing", index_url=url) for _ in range(2)]
        store = get_job_store(settings)
        ids = []
        for n in range(DOCUMENTS):
            note = upload_dir / f"note-{n}.md"
            paragraphs = "\n\n".join(
                f"Paragraph {p} of note {n}: the ferry leaves pier {n} at {p} o'clock."
                for p in range(1 + n % 4)
            )
            note.write_text(f"# Note {n}\n\n{paragraphs}\n")
            ids.append(
                submitter.submit(
                    "morag.tasks.document_tasks.process_document_task",
                    kind="document",
                    queue="document_processing",
                    kwargs={
                        "file_path": str(note),
                        "metadata": {"filename": note.name},
                        # small chunks: a document has several, so a doubled write shows
                        "options": {"chunk_size_tokens": 16, "chunk_overlap_tokens": 2},
                    },
                )
            )

        def succeeded() -> int:
            return sum(1 for r in store.get_many(ids) if r and r.status == TaskStatus.SUCCESS)

        wait_for(lambda: succeeded() >= 3, 180, "the first jobs to be indexed")
        os.kill(server.pid, signal.SIGKILL)  # jobs in flight
        server.process.wait(10)

        def waiting() -> bool:
            return any("index unreachable; waiting" in w.log() for w in pair)

        wait_for(waiting, 120, "a job to meet the dead index")
        wait_for(lambda: _started(server), 60, "the index to start again", interval=0.5)
        records = wait_all_final(store, ids, timeout=300)

        # a job the outage made fail its attempt was retried: that start is explained
        retries = {
            i: sum(1 for e in events if e.get("stage") == "retry")
            for i, events in histories(store, ids).items()
        }
        expected_starts = {i: 1 + n for i, n in retries.items()}
        tally = audit("index-restart/two-workers", store, ids, records, expected_starts)
        assert tally.completed == DOCUMENTS and not tally.problems, tally.line()
        assert len({records[i].worker for i in ids}) == 2  # both workers indexed
        expected = {r.result["document_id"]: r.result["chunk_count"] for r in records.values()}
        assert len(expected) == DOCUMENTS
        conn = connect(url)
        try:
            stored = dict(
                conn.run(
                    "SELECT d.document_id, count(c.id) FROM morag_documents d "
                    "LEFT JOIN morag_chunks c USING (owner, document_id) GROUP BY 1"
                )
            )
            listed = dict(conn.run("SELECT document_id, chunk_count FROM morag_documents"))
        finally:
            conn.close()
        assert stored == expected  # every document, each with exactly its chunks
        assert sum(expected.values()) > 2 * DOCUMENTS
        assert listed == expected
        retried = sum(1 for n in retries.values() if n)
        report.record(
            tally,
            documents=DOCUMENTS,
            chunks=sum(expected.values()),
            jobs_retried=retried,
        )
    finally:
        workers.stop_all()
        server.stop()


def _started(server: EmbeddedPostgres) -> bool:
    """Start the killed server again; its orphaned backends may hold the data directory
    for a moment, so a failed start is tried again."""
    try:
        server.start(timeout=10)
    except Exception:  # noqa: BLE001 - ConfigurationError while the old backends exit
        return False
    return True
