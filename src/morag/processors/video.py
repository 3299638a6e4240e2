"""Video processor: metadata, keyframes and the transcript of the audio track.

Keyframes are taken from frames sampled along the video: a sample becomes a keyframe when
it differs enough from the previous sample (a scene change, measured on tiny RGB
thumbnails) or when ``interval`` seconds passed since the last keyframe. Cost is bounded:
at most ``_MAX_SAMPLES`` samples, reached by decoding forward when the next sample is near
and by seeking when it is far, so a two-hour video is not decoded frame by frame. When
there are more keyframes than ``limits.max_keyframes``, interval frames in the densest
spots go first, then the weakest scene changes.

The audio track goes through the audio processor (PyAV decodes it straight from the
video container), with its progress mapped into this job's span and stages.
"""

from __future__ import annotations

import io
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from morag.core.errors import InvalidInputError
from morag.processors.audio import (
    check_size,
    duration_error,
    ffmpeg_reason,
    format_timestamp,
    process_audio,
    transcript_markdown,
)
from morag.processors.base import (
    Artifact,
    ChunkingOptions,
    ProcessingResult,
    ProcessorLimits,
    ProgressCallback,
    no_progress,
)

#: Mean absolute difference (0..1) of two thumbnails above which a scene changed.
SCENE_THRESHOLD = 0.12
_MAX_SAMPLES = 300
_MIN_SAMPLE_STEP = 0.5  # seconds
#: A sample further ahead than this is reached by seeking rather than decoding forward.
_SEEK_GAP = 5.0  # seconds
_THUMB_SIZE = (32, 18)
_MAX_KEYFRAME_WIDTH = 1280
_JPEG_QUALITY = 85
#: Demuxers of still images: an image is not a video even though PyAV opens it as one.
_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe")

# Overall progress at which each stage starts.
_KEYFRAMES_AT, _AUDIO_AT, _AUDIO_END = 0.02, 0.35, 0.95
# The audio processor's stages, as this job reports them.
_AUDIO_STAGES = {"chunking": "chunking", "finalising": "chunking"}


@dataclass
class _Keyframe:
    time: float
    score: float
    jpeg: bytes


def probe_video(path: Path) -> dict[str, Any]:
    """Metadata of a video file; InvalidInputError when it is not a readable video."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"not a readable video file ({ffmpeg_reason(exc)})") from exc
    with container:
        if not container.streams.video or container.format.name in _IMAGE_FORMATS:
            raise InvalidInputError("the file has no video stream")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        duration = None
        if container.duration:
            duration = container.duration / av.time_base
        elif video.duration and video.time_base:
            duration = float(video.duration * video.time_base)
        rate = video.average_rate or video.guessed_rate
        return {
            "format": container.format.name,
            "duration": round(duration, 3) if duration else None,
            "width": video.codec_context.width,
            "height": video.codec_context.height,
            "fps": round(float(rate), 3) if rate else None,
            "video_codec": video.codec_context.name,
            "audio_codec": audio.codec_context.name if audio else None,
            "has_audio": audio is not None,
        }


def _sample_times(duration: float | None, interval: float) -> Iterable[float]:
    """When to look at the video: evenly, at most ``_MAX_SAMPLES`` times if its length is known."""
    if duration is None:
        # Length unknown (a streamed WebM): sample until the end; the caller bounds it.
        return itertools.count(0.0, min(interval, _MIN_SAMPLE_STEP * 2))
    step = min(interval, max(_MIN_SAMPLE_STEP, duration / _MAX_SAMPLES))
    return [i * step for i in range(max(1, math.ceil(duration / step)))]


def _frames_at(container: Any, stream: Any, times: Iterable[float]) -> Iterator[tuple[float, Any]]:
    """Yield (time from the start, frame) of the first frame at or after each time."""
    start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
    half_frame = 0.5 / float(stream.average_rate) if stream.average_rate else 0.02
    frames: Iterator[Any] | None = None
    position = -math.inf
    # A seek lands on the keyframe before its target, so it only saves work when the target
    # is further ahead than keyframes are apart; learn that distance from each seek.
    seek_gap = _SEEK_GAP
    seeked_to: float | None = None
    for target in times:
        if frames is None or target - position > seek_gap:
            if frames is not None:
                container.seek(int((start + target) / stream.time_base), stream=stream)
                seeked_to = target
            frames = container.decode(stream)
        for frame in frames:
            position = frame.time - start if frame.time is not None else position
            if seeked_to is not None:
                seek_gap = max(seek_gap, seeked_to - position)
                seeked_to = None
            if position >= target - half_frame:
                yield max(position, 0.0), frame
                break
        else:
            return  # the stream ended


def _thumbnail(frame: Any) -> np.ndarray:
    width, height = _THUMB_SIZE
    # AREA averages the pixels it merges: steadier than point sampling, 6x cheaper than the default.
    small = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    return small.to_ndarray()


def _jpeg(frame: Any) -> bytes:
    if frame.width > _MAX_KEYFRAME_WIDTH:
        height = round(frame.height * _MAX_KEYFRAME_WIDTH / frame.width / 2) * 2
        frame = frame.reformat(width=_MAX_KEYFRAME_WIDTH, height=height)
    buffer = io.BytesIO()
    frame.to_image().save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return buffer.getvalue()


def _least_needed(keyframes: list[_Keyframe]) -> int:
    """Index of the keyframe to drop: an interval frame in the densest spot, else the
    weakest scene change. The first keyframe always stays."""
    fills = [i for i in range(1, len(keyframes)) if keyframes[i].score < SCENE_THRESHOLD]
    if not fills:
        return min(range(1, len(keyframes)), key=lambda i: keyframes[i].score)

    def room(i: int) -> float:  # the gap left behind if keyframe i went
        after = keyframes[i + 1].time if i + 1 < len(keyframes) else keyframes[i].time
        return after - keyframes[i - 1].time

    return min(fills, key=room)


def extract_keyframes(
    path: Path,
    duration: float | None,
    limits: ProcessorLimits,
    report: ProgressCallback = no_progress,
) -> list[_Keyframe]:
    """Pick and JPEG-encode up to ``limits.max_keyframes`` keyframes, in time order."""
    if limits.max_keyframes <= 0:
        return []
    interval = limits.keyframe_interval_seconds
    if duration:
        # Spread keyframes over the whole video rather than spending them all early.
        interval = max(interval, duration / limits.max_keyframes)
    chosen: list[_Keyframe] = []
    previous: np.ndarray | None = None
    last_time = -math.inf
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise InvalidInputError(f"not a readable video file ({ffmpeg_reason(exc)})") from exc
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for t, frame in _frames_at(container, stream, _sample_times(duration, interval)):
                if t > limits.max_media_seconds:
                    raise duration_error(t, limits)
                thumb = _thumbnail(frame).astype(np.int16)
                score = 1.0 if previous is None else float(np.abs(thumb - previous).mean() / 255)
                previous = thumb
                if score >= SCENE_THRESHOLD or t - last_time >= interval:
                    chosen.append(_Keyframe(round(t, 3), score, _jpeg(frame)))
                    last_time = t
                    if len(chosen) > limits.max_keyframes:
                        del chosen[_least_needed(chosen)]
                done = t / duration if duration else 0.0
                report(done, "extracting_keyframes", f"{len(chosen)} keyframes at {t:.1f} s")
        except av.FFmpegError as exc:
            if previous is None:
                raise InvalidInputError(f"cannot decode the video ({ffmpeg_reason(exc)})") from exc
    if previous is None:
        raise InvalidInputError("the video stream holds no decodable frames")
    return chosen


def _save_keyframes(keyframes: list[_Keyframe], artifact_dir: Path, job_id: str) -> list[Artifact]:
    job_dir = artifact_dir / job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    for stale in job_dir.glob("keyframe_*.jpg"):  # left by an earlier attempt of this job
        stale.unlink()
    artifacts = []
    for index, keyframe in enumerate(keyframes):
        name = f"keyframe_{index:04d}_{keyframe.time:.1f}s.jpg"
        (job_dir / name).write_bytes(keyframe.jpeg)
        artifacts.append(
            Artifact(
                name=name,
                path=f"{job_id}/{name}",
                media_type="image/jpeg",
                metadata={"timestamp": keyframe.time, "scene_score": round(keyframe.score, 4)},
            )
        )
    return artifacts


def _markdown(path: Path, info: dict[str, Any], transcript: str, frames: list[Artifact]) -> str:
    duration = format_timestamp(info["duration"]) if info["duration"] else "unknown"
    fps = f" at {info['fps']:g} fps" if info["fps"] else ""
    lines = [
        f"# {path.name}",
        "",
        f"- Duration: {duration}",
        f"- Resolution: {info['width']}×{info['height']}{fps}",
        f"- Video codec: {info['video_codec']}",
        f"- Audio codec: {info['audio_codec'] or 'none (no audio track)'}",
        "",
        "## Transcript",
        "",
        transcript.rstrip("\n"),
        "",
        "## Keyframes",
        "",
    ]
    for frame in frames:
        stamp = format_timestamp(frame.metadata["timestamp"])
        lines.append(f"- **[{stamp}]** ![Keyframe at {stamp}]({frame.path})")
    if not frames:
        lines.append("_No keyframes._")
    return "\n".join(lines) + "\n"


def process_video(
    path: Path,
    *,
    artifact_dir: Path,
    job_id: str,
    model: str = "",
    device: str = "cpu",
    compute_type: str = "int8",
    options: ChunkingOptions = ChunkingOptions(),  # noqa: B008 - frozen, safe to share
    limits: ProcessorLimits = ProcessorLimits(),  # noqa: B008 - frozen, safe to share
    progress: ProgressCallback = no_progress,
    source_name: str | None = None,
) -> ProcessingResult:
    """Video to Markdown: metadata, transcript chunks with times, and keyframe images.
    ``source_name`` is what the client called the input."""
    name = source_name or path.name
    path = Path(path)
    if not job_id or job_id in (".", "..") or Path(job_id).name != job_id:
        raise InvalidInputError("job_id must be a plain name", details={"job_id": job_id})

    progress(0.0, "validating", f"reading {path.name}")
    size = check_size(path, limits)
    info = probe_video(path)
    if info["duration"] and info["duration"] > limits.max_media_seconds:
        raise duration_error(info["duration"], limits)

    progress(_KEYFRAMES_AT, "extracting_keyframes", "sampling frames")
    started = time.perf_counter()
    span = _AUDIO_AT - _KEYFRAMES_AT
    keyframes = extract_keyframes(
        path,
        info["duration"],
        limits,
        lambda f, s, m="": progress(_KEYFRAMES_AT + span * min(f, 1.0), s, m),
    )
    keyframe_seconds = time.perf_counter() - started
    artifacts = _save_keyframes(keyframes, Path(artifact_dir), job_id)
    try:
        metadata: dict[str, Any] = {
            "title": Path(name).stem,
            "source": name,
            "size_bytes": size,
            **info,
            "keyframe_count": len(artifacts),
            "keyframe_seconds": round(keyframe_seconds, 3),
        }
        chunks = []
        transcript = "_No audio track._\n"
        if info["has_audio"]:

            def audio_progress(fraction: float, stage: str, message: str = "") -> None:
                progress(fraction, _AUDIO_STAGES.get(stage, "transcribing"), message)

            audio = process_audio(
                path,
                model=model,
                device=device,
                compute_type=compute_type,
                options=options,
                limits=limits,
                progress=audio_progress,
                progress_span=(_AUDIO_AT, _AUDIO_END),
                source_name=name,
            )
            chunks = audio.chunks
            transcript = transcript_markdown(audio.metadata["segments"])
            for key in ("language", "language_probability", "speech_detected", "segments"):
                metadata[key] = audio.metadata[key]
            metadata["transcribe_seconds"] = audio.metadata["transcribe_seconds"]
            if not metadata["duration"]:
                metadata["duration"] = audio.metadata["duration"]
        else:
            metadata.update(speech_detected=False, segments=[])

        progress(_AUDIO_END, "finalising", f"{len(chunks)} chunks, {len(artifacts)} keyframes")
        markdown = _markdown(Path(name), metadata, transcript, artifacts)
        result = ProcessingResult(
            kind="video", markdown=markdown, chunks=chunks, metadata=metadata, artifacts=artifacts
        )
        progress(1.0, "finalising", "done")
        return result
    except BaseException:
        # A failed or cancelled job leaves no half set of images behind.
        for artifact in artifacts:
            (Path(artifact_dir) / artifact.path).unlink(missing_ok=True)
        raise
