"""An uploaded HTML page's own content, without the navigation around it.

Only what the page's markup declares is used, nothing is guessed from text statistics:

- the content the page marks as main (``<main>``, ``role="main"``), else its one
  ``<article>`` when that holds most of the page's text, else the whole ``<body>``;
- without, wherever they are, ``<nav>`` and elements whose role is navigation, search,
  banner or contentinfo, the page's own ``<header>`` and ``<footer>`` (not an article's
  or a section's), forms that hold no text content (search boxes, logins), and permalink
  anchors (Sphinx's ``¶`` after each heading). Scripts and styles markitdown drops itself.

A page without any of that markup is returned unchanged, so ordinary HTML comes through
whole. Web pages fetched by URL are another matter (processors/web.py): pages of the open
web rarely mark their parts, so trafilatura's heuristics pick their main text.
"""

from __future__ import annotations

from dataclasses import dataclass

from bs4 import BeautifulSoup, Tag

_NAV_ROLES = {"navigation", "search"}
_PAGE_PARTS = {"header", "footer"}
_PAGE_PART_ROLES = {"banner", "contentinfo"}
# A header or footer inside one of these belongs to it, not to the page (HTML-AAM).
_SCOPING_TAGS = {"article", "aside", "main", "nav", "section"}
_SCOPING_ROLES = {"article", "complementary", "main", "navigation", "region"}
# A form holding any of these is content (some frameworks wrap a whole page in a form).
_CONTENT_TAGS = ["p", "h1", "h2", "h3", "h4", "h5", "h6", "table", "pre", "ul", "ol", "dl"]
_PERMALINK_MARKS = {"¶", "#", "§", "🔗", "⚓"}
# An <article> is the page's content only when it holds at least this share of its text
# (a listing of several posts, or a small card beside the text, is not).
_ARTICLE_SHARE = 0.5


@dataclass
class PageContent:
    """The HTML to convert, the page's ``<title>``, and which part was kept.

    ``kept`` is ``main``, ``article``, ``body`` (navigation removed) or ``page`` (the
    HTML unchanged).
    """

    html: str
    title: str | None
    kept: str


def page_content(html: str) -> PageContent:
    """The page's main content as HTML (see the module docstring)."""
    soup = BeautifulSoup(html, "html.parser")
    title = str(soup.title.string) if soup.title is not None and soup.title.string else None
    root: Tag = soup.body or soup
    removed = _remove_chrome(root)

    regions, kept = _outermost([t for t in root.find_all(_is_main) if _has_text(t)]), "main"
    if not regions:
        articles = _outermost(root.find_all(_is_article))
        page_text = _text_length(root)
        if len(articles) == 1 and _text_length(articles[0]) >= _ARTICLE_SHARE * page_text:
            regions, kept = articles, "article"
    if not regions:
        if not removed:
            return PageContent(html, title, "page")
        return PageContent(f"<html><body>{root.decode_contents()}</body></html>", title, "body")

    parts = [str(region) for region in regions]
    if not any(region.find("h1") for region in regions):
        # The page's title heading often sits in its header, above <main>: keep it on top.
        heading = root.find("h1")
        if heading is not None:
            parts.insert(0, str(heading))
    return PageContent("<html><body>" + "".join(parts) + "</body></html>", title, kept)


def _remove_chrome(root: Tag) -> int:
    """Remove navigation, search, page header and footer, empty forms, permalinks; count them."""
    found = [tag for tag in root.find_all(True) if _is_chrome(tag)]
    for tag in found:
        if not tag.decomposed:  # already gone with an enclosing element
            tag.decompose()
    return len(found)


def _is_chrome(tag: Tag) -> bool:
    roles = _roles(tag)
    if tag.name == "nav" or roles & _NAV_ROLES:
        return True
    if tag.name in _PAGE_PARTS or roles & _PAGE_PART_ROLES:
        # A page header holding the page's title heading stays (its nav goes on its own).
        return _belongs_to_page(tag) and tag.find("h1") is None
    if tag.name == "form":
        return tag.find(_CONTENT_TAGS) is None
    if tag.name == "a":
        href = str(tag.get("href") or "")
        classes = tag.get_attribute_list("class")
        return href.startswith("#") and (
            tag.get_text(strip=True) in _PERMALINK_MARKS or "headerlink" in classes
        )
    return False


def _belongs_to_page(tag: Tag) -> bool:
    """True for a header/footer (or banner/contentinfo) that is not inside a section."""
    if tag.name not in _PAGE_PARTS:
        return True  # an explicit banner or contentinfo role is the page's by definition
    return not any(
        parent.name in _SCOPING_TAGS or _roles(parent) & _SCOPING_ROLES
        for parent in tag.parents
        if isinstance(parent, Tag)
    )


def _roles(tag: Tag) -> set[str]:
    return set(str(tag.get("role") or "").lower().split())


def _is_main(tag: Tag) -> bool:
    return tag.name == "main" or "main" in _roles(tag)


def _is_article(tag: Tag) -> bool:
    return tag.name == "article" or "article" in _roles(tag)


def _has_text(tag: Tag) -> bool:
    return bool(tag.get_text(strip=True))


def _text_length(tag: Tag) -> int:
    return len(tag.get_text(" ", strip=True))


def _outermost(tags: list[Tag]) -> list[Tag]:
    """The tags that are not inside another of them, in document order."""
    chosen = set(map(id, tags))
    return [t for t in tags if not any(id(p) in chosen for p in t.parents)]
