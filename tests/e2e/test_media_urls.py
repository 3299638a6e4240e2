"""Audio and video from a URL: the API checks and queues the URL, the worker downloads the
media through the SSRF guard and processes it like an upload.

The media are served from 127.0.0.1 (the test settings exempt loopback from the guard).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import RunningApi
from tests.e2e.test_api import INGEST, STATUS, wait_final
from tests.harness import serve_page, wait_for
from tests.samples import SPEECH, make_video

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture
def client(shared_api: RunningApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_api.url, timeout=15) as http:
        yield http


@pytest.fixture(scope="module")
def media_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``/speech.wav`` (audio/wav), ``/clip.mp4`` (video/mp4) and ``/page.mp3``, a page
    served as text/html under a media name."""
    video = make_video(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=4)
    routes = {
        "/speech.wav": ("audio/wav", SPEECH.read_bytes()),
        "/clip.mp4": ("video/mp4", video.read_bytes()),
        "/page.mp3": ("text/html; charset=utf-8", b"<!doctype html><p>not a recording</p>"),
    }

    with serve_page(routes=routes) as base:
        yield base


def submit(client: httpx.Client, url: str, source_type: str, **extra: object) -> str:
    response = client.post(f"{INGEST}/url", json={"url": url, "source_type": source_type, **extra})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    assert response.headers["location"] == f"{STATUS}/{task_id}"
    return task_id


def stages(client: httpx.Client, task_id: str) -> list[str]:
    events = client.get(f"{STATUS}/{task_id}/history").json()["events"]
    return [event.get("stage") for event in events]


def test_audio_url_is_downloaded_and_transcribed(
    client: httpx.Client, workers, media_server: str, upload_dir: Path, redis_client, namespace
) -> None:
    url = f"{media_server}/speech.wav"
    task_id = submit(client, url, "audio", metadata={"source": "podcast"})
    # The same URL again while the job is queued joins it; as a web page it is other work.
    assert submit(client, url, "audio") == task_id
    workers.start(queues="audio_processing")
    final = wait_final(client, task_id, timeout=120)
    assert final["status"] == "success", final["error"]
    assert final["kind"] == "audio" and final["metadata"] == {"source": "podcast"}
    result = client.get(f"{STATUS}/{task_id}/result").json()
    assert "fox" in result["markdown"].lower()
    assert result["total_chunks"] >= 1
    assert "downloading" in stages(client, task_id)
    # The download was the job's own input: it is deleted now that the job is final.
    owned = json.loads(redis_client.hget(f"{namespace}:job:{task_id}", "owned_files"))
    assert [Path(p).parent for p in owned] == [upload_dir] and owned[0].endswith(".wav")
    wait_for(lambda: not list(upload_dir.glob(f"{task_id}.*")), 30, "the download to go")


def test_video_url_is_downloaded_with_keyframes(
    client: httpx.Client, workers, media_server: str
) -> None:
    task_id = submit(client, f"{media_server}/clip.mp4", "video")
    workers.start(queues="video_processing")
    final = wait_final(client, task_id, timeout=120)
    assert final["status"] == "success", final["error"]
    assert final["kind"] == "video"
    result = client.get(f"{STATUS}/{task_id}/result").json()
    assert len(result["artifacts"]) >= 2
    image = client.get(f"{STATUS}/{task_id}/artifacts/{result['artifacts'][0]['name']}")
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"


def test_a_page_served_as_audio_fails_with_a_reason(
    client: httpx.Client, workers, media_server: str
) -> None:
    task_id = submit(client, f"{media_server}/page.mp3", "audio")
    workers.start(queues="audio_processing")
    final = wait_final(client, task_id)
    assert final["status"] == "failure"
    error = final["error"]
    assert error["type"] in ("UnsupportedFormatError", "InvalidInputError"), final
    assert "text/html" in error["message"] and "Traceback" not in error["message"]
    assert final["attempts"] == 1  # not worth retrying


def test_media_urls_are_checked_before_queuing(client: httpx.Client) -> None:
    response = client.post(
        f"{INGEST}/url", json={"url": "http://10.1.2.3/talk.mp3", "source_type": "video"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "forbidden_target"
    response = client.post(
        f"{INGEST}/url", json={"url": "file:///etc/passwd", "source_type": "audio"}
    )
    assert response.status_code == 422, response.text
