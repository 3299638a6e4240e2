"""The retrieval evaluation's match rule and metrics (bench/retrieval_eval.py) on hand-made
hits shaped like the search API's answers and heading paths like morag's HTML chunks."""

from __future__ import annotations

from bench.retrieval_eval import (
    evaluate,
    first_relevant_rank,
    hit_matches,
    metrics,
    normalise_heading,
)

# What the HTML converter keeps of Sphinx headings (processors/document.py via markitdown).
TOP = (
    '[`json`](#module-json "json: Encode and decode the JSON format.") — JSON encoder and '
    'decoder[¶](#module-json "Permalink to this heading")'
)
BASIC = 'Basic Usage[¶](#basic-usage "Permalink to this heading")'
TARGET = {
    "source": "json.html",
    "anchor": "json.dumps",
    "section_ids": ["module-json", "basic-usage"],
    "section_titles": ["json — JSON encoder and decoder", "Basic Usage"],
}


def hit(source: str, *path: str) -> dict:
    return {
        "text": "...",
        "score": 1.0,
        "document_id": "d",
        "source": source,
        "location": {
            "pages": None,
            "heading_path": list(path),
            "start_seconds": None,
            "end_seconds": None,
        },
    }


def test_a_hit_matches_by_page_and_innermost_section() -> None:
    assert hit_matches(hit("json.html", TOP, BASIC), TARGET)
    # By the heading's words when the anchors are gone (a cleaner heading_path).
    assert hit_matches(hit("json.html", "json — JSON encoder and decoder", "basic  usage"), TARGET)
    # A path as the client named it: only the file name counts.
    assert hit_matches(hit("/tmp/up/json.html", TOP, BASIC), TARGET)


def test_a_hit_elsewhere_does_not_match() -> None:
    assert not hit_matches(hit("pickle.html", TOP, BASIC), TARGET)  # another page
    assert not hit_matches(hit("json.html", TOP), TARGET)  # the enclosing section
    deeper = 'Details[¶](#details "Permalink to this heading")'
    assert not hit_matches(hit("json.html", TOP, BASIC, deeper), TARGET)  # a subsection
    assert not hit_matches(hit("json.html"), TARGET)  # no heading path
    assert not hit_matches({"source": None, "location": None}, TARGET)
    assert hit_matches(hit("json.html", TOP), TARGET, page_only=True)


def test_heading_text_loses_markup_but_keeps_names() -> None:
    assert normalise_heading(TOP) == "json — json encoder and decoder"
    assert normalise_heading(r"[`\_\_future\_\_`](#module-__future__) — Future") == (
        "__future__ — future"
    )


def test_ranks_and_metrics() -> None:
    other = hit("pickle.html", "Pickle")
    hits = [other, other, hit("json.html", TOP, BASIC), other]
    assert first_relevant_rank(hits, [TARGET]) == 3
    assert first_relevant_rank(hits, [TARGET], k=2) is None
    assert first_relevant_rank([other], [TARGET]) is None
    assert metrics([1, 3, None, 2]) == {
        "recall": 0.75,
        "mrr": round((1 + 1 / 3 + 1 / 2) / 4, 4),
        "queries": 4,
    }
    assert metrics([])["recall"] == 0.0


def test_evaluate_scores_each_query_against_any_of_its_targets() -> None:
    second = {
        **TARGET,
        "source": "pickle.html",
        "section_ids": ["pickle"],
        "section_titles": ["Pickle"],
    }
    queries = [
        {"query": "a", "targets": [TARGET]},
        {"query": "b", "targets": [TARGET, second]},
        {"query": "c", "targets": [TARGET]},
    ]
    answers = {
        "a": [hit("json.html", TOP, BASIC)],
        "b": [hit("x.html"), hit("pickle.html", "Pickle")],
        "c": [hit("json.html", TOP)],
    }
    result = evaluate(queries, lambda q: answers[q])
    assert result["ranks"] == [1, 2, None]
    assert (result["recall"], result["mrr"]) == (round(2 / 3, 4), 0.5)
    assert result["page"]["recall"] == 1.0
