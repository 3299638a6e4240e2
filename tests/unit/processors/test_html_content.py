"""Uploaded HTML keeps the page's main content (processors/html_content.py), end to end
through ``process_document``: navigation, search boxes and footers never become chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
from markitdown.converters import HtmlConverter

from morag.processors.base import ChunkingOptions
from morag.processors.document import process_document
from morag.processors.html_content import page_content

FIXTURE = Path(__file__).parents[2] / "fixtures" / "sphinx-page.html"
PYTHON_DOCS_RE = Path("/usr/share/doc/python3.11/html/library/re.html")  # Debian python3.11-doc
# What Sphinx puts around a page, never its content.
CHROME = [
    "Navigation",
    "Table of Contents",
    "Previous topic",
    "Next topic",
    "This Page",
    "Report a Bug",
    "Show Source",
    "Quick search",
    "Permalink to this",
    "¶",
    "Copyright",
    "Created using",
    "index",
    "modules",
]


def html_file(tmp_path: Path, body: str, head: str = "<title>Page</title>") -> Path:
    path = tmp_path / "page.html"
    path.write_text(f"<!doctype html><html><head>{head}</head><body>{body}</body></html>")
    return path


def test_sphinx_page_keeps_its_main_content_only() -> None:
    result = process_document(FIXTURE, options=ChunkingOptions(32, 0))

    md = result.markdown
    for words in CHROME:
        assert words not in md, words
        assert all(words not in c.text for c in result.chunks), words
    assert md.startswith('# [`tally`](#module-tally "tally: Counting things.") — Counting things')
    assert "| small | 40 |" in md  # table
    assert '```\n    >>> tally.count("small")\n    40\n    ```' in md  # code block
    assert "tally.count(*jar*)\n:   Return how many marbles" in md  # API signature
    assert "* Pebbles are counted twice.\n* Buttons are never counted." in md  # list
    assert result.metadata["title"] == "tally — Counting things — Example 1.0 documentation"
    assert result.metadata["html_content"] == "main"
    paths = {tuple(c.metadata["heading_path"]) for c in result.chunks}
    assert paths == {
        ("tally — Counting things",),
        ("tally — Counting things", "Jar sizes"),
        ("tally — Counting things", "Functions"),
    }


@pytest.mark.skipif(not PYTHON_DOCS_RE.exists(), reason="Debian's python3.11-doc not installed")
def test_a_real_sphinx_page_from_python_docs() -> None:
    """The fixture's shape on a real page (the committed fixture covers the same)."""
    result = process_document(PYTHON_DOCS_RE)

    assert result.metadata["html_content"] == "main"
    assert result.metadata["title"].startswith("re — Regular expression operations")
    for words in ["Previous topic", "Next topic", "Report a Bug", "Show Source", "Permalink"]:
        assert all(words not in c.text for c in result.chunks), words
    paths = [c.metadata["heading_path"] for c in result.chunks]
    assert paths[0] == ["re — Regular expression operations"]
    assert paths[-1] == [
        "re — Regular expression operations",
        "Regular Expression Examples",
        "Writing a Tokenizer",
    ]
    assert "Token(type='ENDIF', value='ENDIF', line=5, column=4)" in result.markdown


def test_plain_page_without_markup_comes_through_whole(tmp_path: Path) -> None:
    body = (
        "<h1>Minutes</h1><p>First paragraph.</p><p>Second <b>bold</b> paragraph.</p>"
        "<table><tr><th>a</th></tr><tr><td>1</td></tr></table><p>Last words.</p>"
        "<script>track('visit')</script>"  # markitdown drops scripts itself
    )
    path = html_file(tmp_path, body)
    result = process_document(path)

    assert result.metadata["html_content"] == "page"
    whole = HtmlConverter().convert_string(path.read_text()).markdown
    assert result.markdown == whole  # exactly what markitdown makes of the whole page
    assert "First paragraph." in whole and "Last words." in whole and "| 1 |" in whole
    assert "track" not in whole


def test_nav_header_footer_of_the_page_go_but_an_articles_header_stays(tmp_path: Path) -> None:
    body = (
        "<header><a href='/'>Home</a> <a href='/blog'>Blog</a></header>"
        "<nav><ul><li>Archive</li></ul></nav>"
        "<section><header><p>By Ada, March 2024</p></header><h2>Notes</h2><p>Body text.</p>"
        "<footer><p>Filed under notes.</p></footer></section>"
        "<div role='contentinfo'>Site licence</div><footer>Contact us</footer>"
    )
    result = process_document(html_file(tmp_path, body))

    md = result.markdown
    assert result.metadata["html_content"] == "body"
    assert "By Ada, March 2024" in md and "Body text." in md and "Filed under notes." in md
    for chrome in ["Home", "Blog", "Archive", "Site licence", "Contact us"]:
        assert chrome not in md, chrome


def test_the_pages_title_heading_stays(tmp_path: Path) -> None:
    # In a page header above <main>: put on top of the main content.
    above_main = (
        "<header><h1>Field Guide</h1><nav>Home | About</nav></header>"
        "<main><h2>Herons</h2><p>Tall birds.</p></main><footer>Contact</footer>"
    )
    result = process_document(html_file(tmp_path, above_main, head=""))
    assert result.markdown == "# Field Guide\n\n## Herons\n\nTall birds."
    assert result.metadata["title"] == "Field Guide"
    assert result.chunks[0].metadata["heading_path"] == ["Field Guide", "Herons"]

    # In a page header with no <main>: the header stays, its navigation goes.
    no_main = "<header><h1>Field Guide</h1><nav>Home | About</nav></header><p>Tall birds.</p>"
    result = process_document(html_file(tmp_path, no_main, head=""))
    assert result.markdown == "# Field Guide\n\nTall birds."


def test_one_article_holding_the_text_is_the_content(tmp_path: Path) -> None:
    article = "<article><h1>Tides</h1><p>" + "The sea rises and falls. " * 20 + "</p></article>"
    aside = "<aside><h3>Popular</h3><ul><li>Other post</li></ul></aside>"
    result = process_document(html_file(tmp_path, article + aside))
    assert result.metadata["html_content"] == "article"
    assert "Other post" not in result.markdown and "The sea rises" in result.markdown

    # A listing of several articles is not one page's content: all of them stay.
    listing = "<article><h2>One</h2><p>First.</p></article><article><h2>Two</h2><p>Second.</p>"
    result = process_document(html_file(tmp_path, listing + "</article>" + aside))
    assert result.metadata["html_content"] == "page"
    assert all(w in result.markdown for w in ["First.", "Second.", "Other post"])

    # A small article beside the text (an embedded card) is not the content either.
    card = "<p>" + "Long body text here. " * 30 + "</p><article><p>A quoted post.</p></article>"
    result = process_document(html_file(tmp_path, card))
    assert "Long body text here." in result.markdown and "A quoted post." in result.markdown


def test_forms_go_unless_they_hold_the_content(tmp_path: Path) -> None:
    # Some frameworks wrap the whole page in one form: its content stays.
    wrapped = "<form action='/post'><h1>Report</h1><p>All the text.</p><input name='x'></form>"
    assert "All the text." in process_document(html_file(tmp_path, wrapped)).markdown

    search = "<p>Text.</p><form action='/search'><input name='q'><button>Search</button></form>"
    result = process_document(html_file(tmp_path, search))
    assert result.markdown == "Text."


def test_an_empty_main_is_not_taken_for_the_content(tmp_path: Path) -> None:
    body = "<nav>Menu</nav><main id='app'></main><div><h1>Served</h1><p>Static text.</p></div>"
    result = process_document(html_file(tmp_path, body))
    assert result.metadata["html_content"] == "body"
    assert result.markdown == "# Served\n\nStatic text."


def test_a_deeply_nested_page_loses_nothing() -> None:
    deep = "<div>" * 3000 + "<p>deep text</p>" + "</div>" * 3000
    page = page_content(f"<html><body><nav>Menu</nav>{deep}<p>after</p></body></html>")
    assert page.kept == "body"
    assert "deep text" in page.html and "after" in page.html and "Menu" not in page.html
