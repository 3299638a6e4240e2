"""Markdown sections and their heading paths (processors/sections.py)."""

from __future__ import annotations

import pytest

from morag.processors.sections import first_heading, heading_text, split_markdown_sections

# Headings as markitdown writes them from Sphinx pages (Python's documentation).
SPHINX_TOP = (
    '[`re`](#module-re "re: Regular expression operations.") — Regular expression '
    'operations[¶](#module-re "Permalink to this heading")'
)


@pytest.mark.parametrize(
    ("markdown", "plain"),
    [
        (SPHINX_TOP, "re — Regular expression operations"),
        ('Flags[¶](#flags "Permalink to this headline")', "Flags"),
        ("Regular Expression Syntax¶", "Regular Expression Syntax"),  # trafilatura's
        ('search() vs. match()[¶](#search-vs-match "Permalink")', "search() vs. match()"),
        ("[Table of Contents](../contents.html)", "Table of Contents"),
        ("[`Match.__getitem__()`](#re.Match.__getitem__)", "Match.__getitem__()"),
        ("**Bold**, *italic*, _under_, __strong__ ***both***", "Bold, italic, under, strong both"),
        ("my_var_name and \\_\\_init\\_\\_ and C\\#", "my_var_name and __init__ and C#"),
        ("*args and **kwargs", "*args and **kwargs"),  # no closing mark: not emphasis
        ("``a `tick` inside``", "a `tick` inside"),
        ("Install <a id='install'></a>", "Install"),
        ("Map<K, V> in Java", "Map<K, V> in Java"),
        ("[![logo](logo.png)](https://example.org)  Home", "logo Home"),
        ("Title [#](#title)", "Title"),
        ("Link [text](https://example.org/a_(b) 'title') end", "Link text end"),
        ("[reference][1] and <https://example.org>", "reference and https://example.org"),
    ],
)
def test_heading_text_is_what_a_reader_sees(markdown: str, plain: str) -> None:
    assert heading_text(markdown) == plain


def test_heading_path_holds_plain_text() -> None:
    markdown = (
        f"# {SPHINX_TOP}\n\nIntro.\n\n"
        '## Module Contents[¶](#module-contents "Permalink to this heading")\n\n'
        '### *Flags* and `re.A`[¶](#flags "Permalink to this heading")\n\nText.\n'
    )
    paths = [s.metadata.get("heading_path") for s in split_markdown_sections(markdown)]
    assert paths == [
        ["re — Regular expression operations"],
        ["re — Regular expression operations", "Module Contents", "Flags and re.A"],
    ]
    # The text itself keeps the Markdown: only the path is reduced.
    assert split_markdown_sections(markdown)[0].text.startswith(f"# {SPHINX_TOP}")
    assert first_heading(markdown) == "re — Regular expression operations"


def test_a_heading_with_no_text_keeps_its_level_but_not_a_place_in_the_path() -> None:
    markdown = "# Guide\n\nIntro.\n\n## ![](icon.png)\n\nBody.\n\n### Deeper\n\nMore.\n"
    paths = [s.metadata.get("heading_path") for s in split_markdown_sections(markdown)]
    assert paths == [["Guide"], ["Guide"], ["Guide", "Deeper"]]


def test_trailing_bare_heading_is_kept() -> None:
    segments = split_markdown_sections("# A\ntext\n# B\n")
    assert [(s.text, s.metadata) for s in segments] == [
        ("# A\ntext", {"heading_path": ["A"]}),
        ("# B", {"heading_path": ["B"]}),
    ]


def test_headings_in_code_blocks_and_text_before_any_heading() -> None:
    segments = split_markdown_sections(
        "Before.\n\n# Title\n\n```python\n# a comment, not a heading\n```\n\n"
        "~~~\n## nor this\n~~~\n"
    )
    assert [s.metadata for s in segments] == [{}, {"heading_path": ["Title"]}]
    assert first_heading("```\n# not this\n```\n\n## *This* one\n") == "This one"
    assert first_heading("no heading at all") is None
