"""Audio processor against the real tiny.en model and real encoded files (no network)."""

from __future__ import annotations

import re
import time
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from morag.core.errors import (
    ConfigurationError,
    InvalidInputError,
    JobCancelledError,
    LimitExceededError,
)
from morag.processors.audio import load_whisper_model, process_audio, resolve_model_path
from morag.processors.base import ProcessorLimits

SPEECH = Path(__file__).parents[2] / "fixtures" / "speech.wav"
KEY_WORDS = {"quick", "brown", "fox", "lazy", "dog"}
STAGES = ["validating", "loading_model", "transcribing", "chunking", "finalising"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Any attempt to reach the Hugging Face hub would fail instead of downloading.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def encode_audio(src: Path, dst: Path, codec: str, rate: int = 16000, **stream_kw) -> Path:
    """Re-encode ``src`` as ``dst`` (container from the suffix) with PyAV."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream(codec, rate=rate, **stream_kw)
        stream.layout = "mono"
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate)
        for frame in [*inp.decode(audio=0), None]:
            if frame is not None:
                frame.pts = None
            for converted in resampler.resample(frame):
                out.mux(stream.encode(converted))
        out.mux(stream.encode(None))
    return dst


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype(np.int16).tobytes())
    return path


def silent_flac(path: Path, seconds: int, rate: int = 1000) -> Path:
    """Hours of silence in a small file: FLAC at 1 kHz stores silence in a few bytes a block."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=rate)
        stream.layout = "mono"
        stream.format = "s16"
        minute = np.zeros((1, rate * 60), dtype=np.int16)
        for _ in range(seconds // 60):
            frame = av.AudioFrame.from_ndarray(minute, format="s16", layout="mono")
            frame.rate = rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def test_transcribes_the_committed_speech() -> None:
    calls: list[tuple[float, str, str]] = []
    result = process_audio(SPEECH, progress=lambda f, s, m="": calls.append((f, s, m)))

    assert result.kind == "audio"
    assert words(result.markdown) >= KEY_WORDS
    meta = result.metadata
    assert meta["language"] == "en"
    assert meta["duration"] == pytest.approx(3.44, abs=0.05)
    assert meta["speech_detected"] is True
    assert meta["segments"], "no segments"
    for segment in meta["segments"]:
        assert 0 <= segment["start"] < segment["end"] <= meta["duration"] + 0.5
    assert words(" ".join(s["text"] for s in meta["segments"])) >= KEY_WORDS
    assert re.search(r"\*\*\[00:00:0\d – 00:00:0\d\]\*\* The quick", result.markdown)

    assert len(result.chunks) == 1
    chunk = result.chunks[0]
    assert words(chunk.text) >= KEY_WORDS
    assert chunk.metadata["source"] == "speech.wav"
    assert chunk.metadata["start"] == meta["segments"][0]["start"]
    assert chunk.metadata["end"] == meta["segments"][-1]["end"]

    fractions = [f for f, _, _ in calls]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    seen = list(dict.fromkeys(s for _, s, _ in calls))
    assert seen == STAGES
    assert any(re.fullmatch(r"transcribed \d+\.\d of 3\.4 s", m) for _, _, m in calls)


@pytest.mark.parametrize(
    ("suffix", "codec", "kw"),
    [
        ("mp3", "libmp3lame", {"bit_rate": 64000}),
        ("flac", "flac", {}),
        ("ogg", "libopus", {"rate": 48000}),
        ("m4a", "aac", {}),
    ],
)
def test_transcribes_other_formats(tmp_path: Path, suffix: str, codec: str, kw: dict) -> None:
    rate = kw.pop("rate", 16000)
    path = encode_audio(SPEECH, tmp_path / f"speech.{suffix}", codec, rate, **kw)
    result = process_audio(path)
    heard = words(result.markdown)
    # Lossy codecs may cost tiny.en a word; most of the sentence must survive.
    assert {"quick", "fox", "lazy"} <= heard
    assert len(KEY_WORDS & heard) >= 4
    assert result.metadata["duration"] == pytest.approx(3.44, abs=0.2)
    assert result.chunks and result.chunks[0].metadata["source"] == f"speech.{suffix}"


def test_stream_that_changes_sample_rate_midway(tmp_path: Path) -> None:
    """Two MP3s glued together (16 kHz then 44.1 kHz): both halves are heard, at the
    right speed, though the joint holds a packet the decoder rejects."""
    first = encode_audio(SPEECH, tmp_path / "a.mp3", "libmp3lame", 16000, bit_rate=64000)
    second = encode_audio(SPEECH, tmp_path / "b.mp3", "libmp3lame", 44100, bit_rate=128000)
    glued = tmp_path / "glued.mp3"
    glued.write_bytes(first.read_bytes() + second.read_bytes())
    result = process_audio(glued)
    assert result.metadata["duration"] == pytest.approx(2 * 3.44, abs=0.3)
    assert result.markdown.lower().count("quick") == 2


def test_silence_is_a_success_without_chunks(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "silence.wav", np.zeros(16000 * 3))
    result = process_audio(path)
    assert result.chunks == []
    assert result.metadata["segments"] == []
    assert result.metadata["speech_detected"] is False
    assert result.metadata["duration"] == pytest.approx(3.0)
    assert "No speech detected" in result.markdown


def test_three_hours_fail_fast_before_decoding(tmp_path: Path) -> None:
    path = silent_flac(tmp_path / "long.flac", 3 * 3600)
    stages: list[str] = []
    started = time.perf_counter()
    with pytest.raises(LimitExceededError) as caught:
        process_audio(path, progress=lambda f, s, m="": stages.append(s))
    assert time.perf_counter() - started < 1.0
    assert caught.value.details["limit"] == "max_media_seconds"
    assert "max_media_seconds" in caught.value.message
    assert caught.value.details["value"] == pytest.approx(3 * 3600)
    assert set(stages) == {"validating"}  # the model was never needed


def test_duration_limit_holds_when_the_header_is_silent(tmp_path: Path) -> None:
    path = silent_flac(tmp_path / "long.flac", 3 * 3600)
    data = bytearray(path.read_bytes())
    # STREAMINFO's 36-bit total-samples field (0 = unknown) ends at byte 26.
    fields = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = fields.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    with av.open(str(path)) as container:
        assert container.duration is None  # the header check cannot see it

    started = time.perf_counter()
    with pytest.raises(LimitExceededError) as caught:
        process_audio(path, limits=ProcessorLimits(max_media_seconds=60))
    assert time.perf_counter() - started < 2.0  # stopped decoding at the limit
    assert caught.value.details["limit"] == "max_media_seconds"


def test_small_duration_limit() -> None:
    with pytest.raises(LimitExceededError, match="max_media_seconds"):
        process_audio(SPEECH, limits=ProcessorLimits(max_media_seconds=2))


def test_size_limit() -> None:
    with pytest.raises(LimitExceededError) as caught:
        process_audio(SPEECH, limits=ProcessorLimits(max_bytes=10_000))
    assert caught.value.details["limit"] == "max_bytes"


def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(path, format="PNG")
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_bytes(np.random.default_rng(1).bytes(50_000)), id="noise"),
        pytest.param(lambda p: p.write_bytes(b"hello, I am a text file\n" * 100), id="text"),
        pytest.param(lambda p: p.write_bytes(SPEECH.read_bytes()[:44]), id="wav-header-only"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(_png, id="image"),
    ],
)
def test_unreadable_input_is_invalid(tmp_path: Path, make) -> None:
    path = tmp_path / "input.mp3"
    make(path)
    with pytest.raises(InvalidInputError) as caught:
        process_audio(path)
    assert type(caught.value) is InvalidInputError
    assert caught.value.message
    assert str(tmp_path) not in caught.value.message


def test_missing_file_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError):
        process_audio(tmp_path / "nowhere.wav")


def test_model_path_must_be_a_local_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="MORAG_WHISPER_MODEL") as caught:
        process_audio(SPEECH, model=str(tmp_path / "no-such-model"))
    assert caught.value.details["setting"] == "MORAG_WHISPER_MODEL"
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ConfigurationError, match="MORAG_WHISPER_MODEL"):
        load_whisper_model(str(tmp_path / "empty-model"))
    # A bare model name is not a directory: refused, not downloaded.
    with pytest.raises(ConfigurationError, match="MORAG_WHISPER_MODEL"):
        load_whisper_model("tiny")


def test_model_is_loaded_once_per_process() -> None:
    packaged = resolve_model_path("")
    assert (packaged / "model.bin").is_file()
    model = load_whisper_model()
    assert load_whisper_model(str(packaged)) is model
    assert load_whisper_model("", "cpu", "int8") is model


def test_cancellation_inside_the_transcription_loop() -> None:
    seen: list[tuple[str, str]] = []

    def progress(fraction: float, stage: str, message: str = "") -> None:
        seen.append((stage, message))
        # The first report is before the loop ("0.0 of"); cancel on one from inside it.
        if stage == "transcribing" and not message.startswith("transcribed 0.0"):
            raise JobCancelledError("cancelled by the user")

    with pytest.raises(JobCancelledError):
        process_audio(SPEECH, progress=progress)
    assert seen[-1][0] == "transcribing"
    assert "chunking" not in {stage for stage, _ in seen}


def test_progress_span_and_monotonic_fractions() -> None:
    fractions: list[float] = []
    process_audio(
        SPEECH,
        progress=lambda f, s, m="": fractions.append(f),
        progress_span=(0.3, 0.6),
    )
    assert fractions == sorted(fractions)
    assert fractions[0] == pytest.approx(0.3) and fractions[-1] == pytest.approx(0.6)
    assert all(0.3 <= f <= 0.6 for f in fractions)
