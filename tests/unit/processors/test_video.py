"""Video processor on videos generated with PyAV in each test (no network)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from morag.core.errors import InvalidInputError, JobCancelledError, LimitExceededError
from morag.processors.base import ProcessorLimits
from morag.processors.video import process_video
from tests.samples import SPEECH, colour_at, make_video

KEY_WORDS = {"quick", "brown", "fox", "lazy", "dog"}
STAGES = ["validating", "extracting_keyframes", "transcribing", "chunking", "finalising"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def mean_colour(jpeg: Path) -> np.ndarray:
    return np.asarray(Image.open(jpeg).convert("RGB"), dtype=float).reshape(-1, 3).mean(axis=0)


def assert_keyframes_match_video(result, artifact_dir: Path, change_every: float) -> None:
    """Each saved image exists, is a JPEG, and shows the colour of its timestamp."""
    for artifact in result.artifacts:
        file = artifact_dir / artifact.path
        assert file.is_file() and file.read_bytes()[:2] == b"\xff\xd8"
        assert artifact.media_type == "image/jpeg"
        expected = colour_at(artifact.metadata["timestamp"], change_every)
        assert np.abs(mean_colour(file) - expected).max() < 40, artifact


def test_mp4_with_speech(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mp4")
    calls: list[tuple[float, str, str]] = []
    result = process_video(
        path,
        artifact_dir=tmp_path / "artifacts",
        job_id="job-1",
        progress=lambda f, s, m="": calls.append((f, s, m)),
    )

    assert result.kind == "video"
    meta = result.metadata
    assert meta["duration"] == pytest.approx(8.0, abs=0.1)
    assert (meta["width"], meta["height"], meta["fps"]) == (160, 120, 10)
    assert (meta["video_codec"], meta["audio_codec"], meta["has_audio"]) == ("h264", "aac", True)
    assert meta["language"] == "en"

    times = [a.metadata["timestamp"] for a in result.artifacts]
    assert 1 < len(times) <= ProcessorLimits().max_keyframes
    assert times == sorted(times) and times[0] == 0.0
    # Colours change every 2 s: each change is a scene change.
    for change in (2.0, 4.0, 6.0):
        assert any(abs(t - change) <= 0.5 for t in times), (change, times)
    assert_keyframes_match_video(result, tmp_path / "artifacts", 2.0)
    assert all(a.path.startswith("job-1/keyframe_") for a in result.artifacts)
    assert result.artifacts[1].name == f"keyframe_0001_{times[1]:.1f}s.jpg"

    assert words(" ".join(c.text for c in result.chunks)) >= {"quick", "fox", "lazy"}
    for chunk in result.chunks:
        assert chunk.metadata["start"] < chunk.metadata["end"]
        assert chunk.metadata["source"] == "clip.mp4"

    assert result.markdown.startswith("# clip.mp4")
    assert "## Transcript" in result.markdown and "## Keyframes" in result.markdown
    for artifact in result.artifacts:
        assert f"]({artifact.path})" in result.markdown

    fractions = [f for f, _, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert list(dict.fromkeys(s for _, s, _ in calls)) == STAGES


def test_video_without_audio(tmp_path: Path) -> None:
    path = make_video(tmp_path / "silent.mp4", audio_codec=None)
    stages: list[str] = []
    result = process_video(
        path,
        artifact_dir=tmp_path,
        job_id="j",
        progress=lambda f, s, m="": stages.append(s),
    )
    assert result.chunks == []
    assert result.metadata["has_audio"] is False
    assert result.metadata["audio_codec"] is None
    assert len(result.artifacts) > 1
    assert "no audio track" in result.markdown
    assert "transcribing" not in stages


@pytest.mark.parametrize(
    ("suffix", "kw"),
    [
        ("mkv", {"codec": "mpeg4", "audio_codec": "libmp3lame"}),
        ("avi", {"codec": "mpeg4", "audio_codec": "libmp3lame"}),
        ("mov", {}),
        (
            "webm",
            {
                "codec": "libvpx",
                "codec_options": {"deadline": "realtime", "cpu-used": "8"},
                "audio_codec": "libopus",
                "audio_rate": 48000,
            },
        ),
    ],
)
def test_other_containers(tmp_path: Path, suffix: str, kw: dict) -> None:
    path = make_video(tmp_path / f"clip.{suffix}", seconds=6.0, **kw)
    result = process_video(path, artifact_dir=tmp_path / "a", job_id="j")
    assert len(result.artifacts) >= 3
    assert_keyframes_match_video(result, tmp_path / "a", 2.0)
    heard = words(" ".join(c.text for c in result.chunks))
    assert heard >= {"quick", "fox"} and len(heard & KEY_WORDS) >= 3


def test_streamed_webm_without_duration(tmp_path: Path) -> None:
    """Browser recordings (MediaRecorder) carry no duration; sampling runs to the end."""

    class Pipe(io.RawIOBase):  # not seekable, so the muxer cannot write the duration
        def __init__(self, file: io.BufferedWriter) -> None:
            self.file = file

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            return self.file.write(data)

    path = tmp_path / "stream.webm"
    with path.open("wb") as file:
        make_video(
            Pipe(file),
            seconds=6.0,
            codec="libvpx",
            codec_options={"deadline": "realtime", "cpu-used": "8"},
            audio_codec=None,
            container_format="webm",
        )
    with av.open(str(path)) as container:
        assert container.duration is None

    result = process_video(path, artifact_dir=tmp_path, job_id="j")
    times = [a.metadata["timestamp"] for a in result.artifacts]
    assert len(times) >= 3 and times == sorted(times)
    assert_keyframes_match_video(result, tmp_path, 2.0)

    with pytest.raises(LimitExceededError, match="max_media_seconds"):
        process_video(
            path, artifact_dir=tmp_path, job_id="k", limits=ProcessorLimits(max_media_seconds=3)
        )


def test_long_video_is_sampled_with_seeks(tmp_path: Path) -> None:
    """30 minutes, a keyframe every 5 s: samples 6 s apart are reached by seeking,
    and every saved image must still show the colour of its timestamp."""
    path = make_video(
        tmp_path / "long.mp4",
        seconds=1800,
        fps=1,
        size=(64, 48),
        codec_options={"g": "5", "preset": "ultrafast"},
        audio_codec=None,
        change_every=300,
    )
    # 7 keyframes: an interval of 1800/7 s, off the colour changes, so they compete.
    limits = ProcessorLimits(max_keyframes=7)
    result = process_video(path, artifact_dir=tmp_path, job_id="j", limits=limits)
    times = [a.metadata["timestamp"] for a in result.artifacts]
    assert len(times) == 7 and times == sorted(times) and times[0] == 0.0
    # All five colour changes survive the cap; interval frames made room.
    for change in (300, 600, 900, 1200, 1500):
        assert any(change <= t < change + 6.5 for t in times), (change, times)
    assert_keyframes_match_video(result, tmp_path, 300)


def test_keyframe_cap_keeps_first_and_strongest(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mp4", audio_codec=None)
    result = process_video(
        path, artifact_dir=tmp_path, job_id="j", limits=ProcessorLimits(max_keyframes=2)
    )
    times = [a.metadata["timestamp"] for a in result.artifacts]
    assert len(times) == 2 and times[0] == 0.0
    # Yellow after blue is the largest change of the clip.
    assert times[1] == pytest.approx(6.0, abs=0.5)


def test_retry_replaces_keyframes_of_an_earlier_attempt(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mp4", audio_codec=None)
    process_video(path, artifact_dir=tmp_path / "a", job_id="j")
    result = process_video(
        path, artifact_dir=tmp_path / "a", job_id="j", limits=ProcessorLimits(max_keyframes=2)
    )
    on_disk = sorted(p.name for p in (tmp_path / "a" / "j").iterdir())
    assert on_disk == sorted(a.name for a in result.artifacts)


def test_cancellation_removes_keyframes(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mp4")

    def progress(fraction: float, stage: str, message: str = "") -> None:
        if stage == "transcribing" and message.startswith("transcribed") and fraction > 0.4:
            raise JobCancelledError("cancelled")

    with pytest.raises(JobCancelledError):
        process_video(path, artifact_dir=tmp_path / "a", job_id="j", progress=progress)
    assert list((tmp_path / "a" / "j").glob("*.jpg")) == []


def test_cancellation_while_extracting_keyframes(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mp4", audio_codec=None)
    calls: list[str] = []

    def progress(fraction: float, stage: str, message: str = "") -> None:
        calls.append(message)
        if stage == "extracting_keyframes" and len(calls) > 5:
            raise JobCancelledError("cancelled")

    with pytest.raises(JobCancelledError):
        process_video(path, artifact_dir=tmp_path / "a", job_id="j", progress=progress)
    assert not (tmp_path / "a" / "j").exists()


def test_duration_limit_checked_before_any_work(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mp4", audio_codec=None)
    with pytest.raises(LimitExceededError) as caught:
        process_video(
            path,
            artifact_dir=tmp_path / "a",
            job_id="j",
            limits=ProcessorLimits(max_media_seconds=5),
        )
    assert caught.value.details["limit"] == "max_media_seconds"
    assert not (tmp_path / "a").exists()


def _truncated_mp4(path: Path) -> None:
    make_video(path)
    path.write_bytes(path.read_bytes()[:2000])  # the index (moov) is at the end: lost


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(np.random.default_rng(2).bytes(50_000)), id="noise"),
        pytest.param(lambda p: p.write_bytes(b"not a video\n" * 100), id="text"),
        pytest.param(lambda p: p.write_bytes(SPEECH.read_bytes()), id="audio-only"),
        pytest.param(
            lambda p: Image.new("RGB", (64, 48), (1, 2, 3)).save(p, format="PNG"), id="image"
        ),
        pytest.param(_truncated_mp4, id="truncated"),
    ],
)
def test_not_a_video_is_invalid(tmp_path: Path, make) -> None:
    path = tmp_path / "input.mp4"
    make(path)
    with pytest.raises(InvalidInputError) as caught:
        process_video(path, artifact_dir=tmp_path / "a", job_id="j")
    assert type(caught.value) is InvalidInputError
    assert str(tmp_path) not in caught.value.message


def test_job_id_cannot_leave_the_artifact_dir(tmp_path: Path) -> None:
    path = make_video(tmp_path / "clip.mp4", audio_codec=None)
    for job_id in ("../escape", "a/b", "", ".."):
        with pytest.raises(InvalidInputError):
            process_video(path, artifact_dir=tmp_path / "a", job_id=job_id)


def test_cap_drops_interval_frames_where_they_are_densest() -> None:
    from morag.processors.video import _Keyframe, _least_needed

    def frames(*pairs: tuple[float, float]) -> list[_Keyframe]:
        return [_Keyframe(t, score, b"") for t, score in pairs]

    # The weakest frame (30 s) is the only one covering the end: the crowded one at 10 s goes.
    assert _least_needed(frames((0, 1.0), (10, 0.05), (12, 0.04), (30, 0.01))) == 1
    # Scene changes stay while any interval frame is left, then the weakest change goes.
    assert _least_needed(frames((0, 1.0), (5, 0.5), (50, 0.01))) == 2
    assert _least_needed(frames((0, 1.0), (5, 0.5), (6, 0.3), (50, 0.9))) == 2
