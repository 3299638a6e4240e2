"""The shared chunker: token bounds, word boundaries, overlap, structure, determinism."""

from __future__ import annotations

import re

import pytest

from morag.processors.base import ChunkingOptions, TextSegment
from morag.processors.chunking import chunk_segments, count_tokens

WORDS = re.compile(r"\S+")


def long_text(sentences: int, tag: str = "topic") -> str:
    return " ".join(
        f"Sentence {i} explains the {tag} number {i % 7} in plain words." for i in range(sentences)
    )


def test_count_tokens_uses_the_packaged_tokenizer() -> None:
    assert count_tokens("") == 0
    assert count_tokens("Hello world, this is a test.") == 8  # GPT-2 BPE of Whisper


@pytest.mark.parametrize(("size", "overlap"), [(32, 0), (64, 16), (128, 32), (512, 64)])
def test_every_chunk_respects_the_token_bound(size: int, overlap: int) -> None:
    segments = [TextSegment(long_text(300), {"page": 1}), TextSegment("tail", {"page": 2})]
    chunks = chunk_segments(segments, ChunkingOptions(size, overlap))

    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.tokens == count_tokens(chunk.text)
        assert chunk.tokens <= size
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_chunks_never_split_a_word() -> None:
    text = long_text(200)
    vocabulary = set(WORDS.findall(text))
    chunks = chunk_segments([TextSegment(text)], ChunkingOptions(40, 10))

    assert len(chunks) > 5
    for chunk in chunks:
        assert set(WORDS.findall(chunk.text)) <= vocabulary, chunk.text


def test_all_text_is_kept_in_order() -> None:
    text = long_text(120)
    chunks = chunk_segments([TextSegment(text)], ChunkingOptions(50, 0))
    assert WORDS.findall(" ".join(c.text for c in chunks)) == WORDS.findall(text)


def test_consecutive_chunks_overlap_at_a_word_boundary() -> None:
    chunks = chunk_segments([TextSegment(long_text(200))], ChunkingOptions(80, 20))

    assert len(chunks) > 3
    for previous, chunk in zip(chunks, chunks[1:], strict=False):
        first_words = WORDS.findall(chunk.text)[:4]
        shared = " ".join(first_words)
        assert shared in previous.text, (previous.text, chunk.text)
        # The overlap starts where a word of the previous chunk starts.
        at = previous.text.rfind(shared)
        assert at == 0 or previous.text[at - 1].isspace()


def test_no_overlap_when_disabled() -> None:
    text = long_text(100)
    chunks = chunk_segments([TextSegment(text)], ChunkingOptions(50, 0))
    total_words = sum(len(WORDS.findall(c.text)) for c in chunks)
    assert total_words == len(WORDS.findall(text))


def test_small_segments_merge_and_record_their_pages() -> None:
    segments = [TextSegment(f"Page {n} says hello.", {"page": n}) for n in range(1, 6)]
    chunks = chunk_segments(segments, ChunkingOptions(512, 64), {"source": "a.pdf"})

    assert len(chunks) == 1
    assert chunks[0].metadata == {
        "source": "a.pdf",
        "position": 0,
        "page": 1,
        "pages": [1, 2, 3, 4, 5],
    }
    assert "Page 1 says hello." in chunks[0].text and "Page 5" in chunks[0].text


def test_a_new_heading_starts_a_new_chunk_without_overlap() -> None:
    segments = [
        TextSegment("# Intro\n\nShort intro.", {"heading_path": ["Intro"]}),
        TextSegment("## Details\n\nShort details.", {"heading_path": ["Intro", "Details"]}),
        TextSegment("More details.", {"heading_path": ["Intro", "Details"]}),
        TextSegment("# Next\n\nEnd.", {"heading_path": ["Next"]}),
    ]
    chunks = chunk_segments(segments, ChunkingOptions(512, 64))

    assert [c.metadata["heading_path"] for c in chunks] == [
        ["Intro"],
        ["Intro", "Details"],
        ["Next"],
    ]
    assert chunks[0].text == "# Intro\n\nShort intro."
    assert chunks[1].text == "## Details\n\nShort details.\n\nMore details."
    assert [c.metadata["position"] for c in chunks] == [0, 1, 3]


def test_transcript_segments_merge_with_start_and_end() -> None:
    segments = [
        TextSegment(
            f"segment {i} of the talk about queues.", {"start": i * 2.0, "end": i * 2.0 + 2}
        )
        for i in range(40)
    ]
    chunks = chunk_segments(segments, ChunkingOptions(64, 0))

    assert 1 < len(chunks) < 40
    assert chunks[0].metadata["start"] == 0.0
    assert chunks[-1].metadata["end"] == 80.0
    for previous, chunk in zip(chunks, chunks[1:], strict=False):
        assert chunk.metadata["start"] == previous.metadata["end"]
        assert chunk.metadata["start"] < chunk.metadata["end"]
    # Transcript segments continue a sentence: joined with a space.
    assert "queues. segment 1 of" in chunks[0].text


def test_a_huge_segment_is_split_at_paragraphs_first() -> None:
    paragraphs = [long_text(6, tag=f"para{p}") for p in range(6)]
    chunks = chunk_segments([TextSegment("\n\n".join(paragraphs))], ChunkingOptions(110, 0))

    assert len(chunks) >= 3
    for chunk in chunks:
        tags = set(re.findall(r"para\d", chunk.text))
        # A paragraph (about 90 tokens) fits: no chunk mixes the end of one with part of another.
        assert all(chunk.text.count(t) == 6 for t in tags), chunk.text


def test_empty_and_whitespace_segments_are_ignored() -> None:
    segments = [TextSegment(""), TextSegment("  \n\t"), TextSegment("real text", {"page": 3})]
    chunks = chunk_segments(segments, ChunkingOptions())
    assert len(chunks) == 1
    assert chunks[0].text == "real text"
    assert chunks[0].metadata["pages"] == [3]
    assert chunks[0].metadata["position"] == 2
    assert chunk_segments([], ChunkingOptions()) == []


def test_common_metadata_survives_and_differing_metadata_is_dropped() -> None:
    segments = [
        TextSegment("one", {"speaker": "A", "lang": "en", "start": 0.0, "end": 1.0}),
        TextSegment("two", {"speaker": "B", "lang": "en", "start": 1.0, "end": 2.0}),
    ]
    (chunk,) = chunk_segments(segments, ChunkingOptions(), {"job": "j1"})
    assert chunk.metadata == {"job": "j1", "position": 0, "lang": "en", "start": 0.0, "end": 2.0}


def test_chunking_is_deterministic() -> None:
    segments = [
        TextSegment(long_text(80), {"page": 1, "heading_path": ["A"]}),
        TextSegment(long_text(30, "idea"), {"page": 2, "heading_path": ["A"]}),
        TextSegment(long_text(50, "fact"), {"page": 2, "heading_path": ["B"]}),
    ]
    first = chunk_segments(segments, ChunkingOptions(64, 16))
    second = chunk_segments(segments, ChunkingOptions(64, 16))
    assert first == second
