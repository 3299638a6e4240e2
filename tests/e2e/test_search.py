"""Upload in, answers out: a real API, real workers, the real embedding model and index.

A PDF, a web page served on loopback and a spoken sentence are each found by a question
whose words are not all in their text; documents are per key; deleting one removes it
from search; the same content ingested again replaces its chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import serve_page, wait_for

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KEY_A, KEY_B = "team-a-key-0001", "team-b-key-0002"
KEYS = f"team-a:{KEY_A},team-b:{KEY_B}"

PDF_TEXT = (
    "The lighthouse keeper climbed two hundred and seventeen steps every evening to light "
    "the lamp that guided the fishing boats safely past the rocks of the northern cape."
)
PAGE = b"""<!doctype html><html><head><title>Sourdough notes</title></head><body><article>
<h1>Sourdough starters</h1>
<p>A sourdough starter is a fermented mixture of flour and water. Wild yeast and lactic
acid bacteria living in it produce carbon dioxide, which leavens the dough and gives the
loaf its open crumb and sour taste. Feed the starter daily with fresh flour.</p>
<p>Bakers keep their starters for years, and some are said to be a century old.</p>
</article></body></html>"""


def make_pdf(path: Path) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    pdf.add_page()
    pdf.multi_cell(0, 10, "Logbook of the cape", new_x="LMARGIN", new_y="NEXT")
    pdf.add_page()
    pdf.multi_cell(0, 10, PDF_TEXT, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))
    return path


@pytest.fixture
def page_url() -> Iterator[str]:
    with serve_page(PAGE) as base:
        yield f"{base}/sourdough.html"


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def finish(client: httpx.Client, key: str, task_id: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        job = client.get(f"/api/v1/status/{task_id}", headers=headers(key)).json()
        return job if job["status"] in ("success", "failure", "revoked") else None

    job = wait_for(final, 120, f"job {task_id} to end", interval=0.2)
    assert job["status"] == "success", job
    return job


def upload(client: httpx.Client, key: str, path: Path, **fields: str) -> str:
    with open(path, "rb") as f:
        answer = client.post(
            "/api/v1/ingest/file", files={"file": (path.name, f)}, data=fields, headers=headers(key)
        )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["task_id"])


def search(client: httpx.Client, key: str, query: str, **body: Any) -> list[dict[str, Any]]:
    answer = client.post("/api/v1/search", json={"query": query, **body}, headers=headers(key))
    assert answer.status_code == 200, answer.text
    return list(answer.json()["hits"])


def test_each_input_is_found_by_a_question_per_key(
    api_factory, workers, tmp_path: Path, page_url: str
) -> None:
    api = api_factory.start(api_keys=KEYS)
    workers.start(concurrency=1)
    pdf = make_pdf(tmp_path / "cape-logbook.pdf")
    with httpx.Client(base_url=api.url, timeout=30) as client:
        jobs = {
            "pdf": upload(client, KEY_A, pdf),
            "audio": upload(client, KEY_A, FIXTURES / "speech.wav"),
        }
        answer = client.post("/api/v1/ingest/url", json={"url": page_url}, headers=headers(KEY_A))
        assert answer.status_code == 202, answer.text
        jobs["web"] = answer.json()["task_id"]
        done = {name: finish(client, KEY_A, task_id) for name, task_id in jobs.items()}
        doc_ids = {name: job["result"]["document_id"] for name, job in done.items()}
        assert all(d and d.startswith("doc_") for d in doc_ids.values()), doc_ids
        history = client.get(f"/api/v1/status/{jobs['pdf']}/history", headers=headers(KEY_A))
        stages = [e.get("stage") for e in history.json()["events"]]
        assert stages.index("embedding") < stages.index("indexing")

        questions = {
            "pdf": ("how many stairs did the lighthouse guardian climb each night", 2),
            "web": ("what makes naturally leavened bread rise", None),
            "audio": ("which animal jumped over the dog", None),
        }
        for name, (question, page) in questions.items():
            hits = search(client, KEY_A, question)
            assert hits and hits[0]["document_id"] == doc_ids[name], (name, hits[:2])
            if page:
                assert page in hits[0]["location"]["pages"]
        audio_hit = search(client, KEY_A, "quick brown fox", mode="keyword")[0]
        assert audio_hit["source"] == "speech.wav"  # the client's name, not the upload's
        assert audio_hit["location"]["start_seconds"] is not None
        assert audio_hit["location"]["end_seconds"] > audio_hit["location"]["start_seconds"]
        web_hit = search(client, KEY_A, "sourdough", filters={"kind": ["web"]})[0]
        assert web_hit["source"] == page_url

        # another key sees none of it, and the ids answer 404 like unknown ones
        assert search(client, KEY_B, "lighthouse keeper steps") == []
        listed = client.get("/api/v1/documents", headers=headers(KEY_B)).json()
        assert listed["total"] == 0
        for doc_id in doc_ids.values():
            for method in ("GET", "DELETE"):
                other = client.request(
                    method, f"/api/v1/documents/{doc_id}", headers=headers(KEY_B)
                )
                assert other.status_code == 404, other.text
        assert client.get("/api/v1/documents", headers=headers(KEY_A)).json()["total"] == 3

        # the same bytes again replace the document's chunks rather than adding copies
        before = client.get(f"/api/v1/documents/{doc_ids['pdf']}", headers=headers(KEY_A))
        again = finish(
            client,
            KEY_A,
            upload(client, KEY_A, pdf, chunk_size_tokens="32", chunk_overlap_tokens="4"),
        )
        assert again["result"]["document_id"] == doc_ids["pdf"]
        after = client.get(f"/api/v1/documents/{doc_ids['pdf']}", headers=headers(KEY_A))
        assert after.json()["job_id"] != before.json()["job_id"]
        assert client.get("/api/v1/documents", headers=headers(KEY_A)).json()["total"] == 3
        chunks = search(
            client,
            KEY_A,
            "lighthouse",
            mode="vector",
            k=100,
            filters={"document_ids": [doc_ids["pdf"]]},
        )
        count = after.json()["chunk_count"]
        assert count > 1  # smaller chunks this time
        assert sorted(h["chunk_index"] for h in chunks) == list(range(count))

        # indexing off: the job ends with chunks and no document
        off = finish(client, KEY_B, upload(client, KEY_B, FIXTURES / "speech.wav", index="false"))
        assert off["result"]["document_id"] is None
        assert client.get("/api/v1/documents", headers=headers(KEY_B)).json()["total"] == 0

        # deleting a document removes it from search
        gone = client.delete(f"/api/v1/documents/{doc_ids['web']}", headers=headers(KEY_A))
        assert gone.status_code == 204
        hits = search(client, KEY_A, "what makes naturally leavened bread rise")
        assert doc_ids["web"] not in {h["document_id"] for h in hits}
        missing = client.get(f"/api/v1/documents/{doc_ids['web']}", headers=headers(KEY_A))
        assert missing.status_code == 404
