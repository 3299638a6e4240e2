"""Markdown cut into sections at its headings, each with a ``heading_path`` of plain text.

Every processor that turns Markdown into segments (documents, web pages) uses this, so a
heading path is built and cleaned in one place: ``heading_text`` reduces a Markdown heading
to the words a reader sees (links to their text, no permalink marks, no emphasis or code
marks, no escapes), which is what search hits show and what filters compare.
"""

from __future__ import annotations

import re

from morag.processors.base import TextSegment

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")

_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") or ![alt](src): the target may hold one level of parentheses
# and a quoted title with anything in it (Sphinx titles hold "re: Regular ...").
_LINK = re.compile(
    r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]"
    r"\((?:[^()\s\"']|\([^()]*\))*(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)"
)
_REFERENCE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\[[^\]]*\]")
_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
# Inline HTML that Markdown authors put in headings (anchors, code, emphasis); only known
# tag names, so text such as "Map<K, V>" survives.
_INLINE_TAG = re.compile(
    r"</?(?:a|abbr|b|br|code|em|i|kbd|mark|s|small|span|strong|sub|sup|u)\b[^>]*>", re.I
)
_STRONG = re.compile(r"(?<![\w\\])(\*\*|__)(?=\S)(.+?)(?<=\S)\1(?!\w)")
_EMPHASIS = re.compile(r"(?<![\w\\*])([*_])(?=[^\s*_])(.+?)(?<=[^\s\\])\1(?![\w*])")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
# Marks that documentation generators put after a heading as its permalink.
_PERMALINK_MARKS = {"¶", "#", "§", "🔗", "⚓"}
_PILCROW = "¶"
_PLACEHOLDER = re.compile("\ue000(\\d+)\ue001")


def heading_text(markdown: str) -> str:
    """The plain text of a Markdown heading's content (without its leading ``#``)."""
    spans: list[str] = []

    def keep_code(match: re.Match[str]) -> str:
        spans.append(match.group(2).strip() or match.group(2))
        return f"\ue000{len(spans) - 1}\ue001"

    def link_text(match: re.Match[str]) -> str:
        text = match.group(1)
        return "" if _PLACEHOLDER.sub("", text).strip() in _PERMALINK_MARKS else text

    text = _CODE_SPAN.sub(keep_code, markdown)  # code is literal: no markup inside
    previous = None
    while previous != text:  # links inside links' text, e.g. an image in a link
        previous = text
        text = _REFERENCE_LINK.sub(link_text, _LINK.sub(link_text, text))
    text = _AUTOLINK.sub(r"\1", _INLINE_TAG.sub("", text))
    previous = None
    while previous != text:  # ***both*** and nested emphasis
        previous = text
        text = _EMPHASIS.sub(r"\2", _STRONG.sub(r"\2", text))
    text = _ESCAPE.sub(r"\1", text).replace(_PILCROW, "")
    text = _PLACEHOLDER.sub(lambda m: spans[int(m.group(1))], text)
    return " ".join(text.split())


def split_markdown_sections(markdown: str) -> list[TextSegment]:
    """Cut Markdown into one segment per heading section, with its ``heading_path``.

    A heading directly followed by another heading is carried into the next section, so
    no segment is a bare title. Headings inside fenced code blocks are ignored. The path
    holds each heading's plain text (``heading_text``); a heading with no text left (an
    image alone) keeps its level but is left out of the path.
    """
    segments: list[TextSegment] = []
    stack: list[tuple[int, str]] = []
    lines: list[str] = []
    has_body = False
    carried = ""
    fence = ""

    def path() -> list[str]:
        return [t for _, t in stack if t]

    def close() -> None:
        nonlocal carried
        text = "\n".join(lines).strip()
        if not text:
            return
        if carried:
            text = carried + "\n\n" + text
            carried = ""
        if has_body:
            segments.append(TextSegment(text, {"heading_path": path()} if path() else {}))
        else:
            carried = text

    for line in markdown.splitlines():
        fence_match = _FENCE.match(line)
        if fence_match:
            marker = fence_match.group(1)
            if not fence:
                fence = marker[0] * 3
            elif marker.startswith(fence):
                fence = ""
        heading = None if fence or fence_match else _HEADING.match(line)
        if heading:
            close()
            level = len(heading.group(1))
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, heading_text(heading.group(2))))
            lines, has_body = [line], False
        else:
            lines.append(line)
            has_body = has_body or bool(line.strip())
    close()
    if carried:  # trailing headings with nothing under them
        segments.append(TextSegment(carried, {"heading_path": path()} if path() else {}))
    return segments


def first_heading(markdown: str) -> str | None:
    """The plain text of the first heading outside code blocks, if any."""
    for segment in split_markdown_sections(markdown):
        path = segment.metadata.get("heading_path")
        if path:
            return str(path[0])
    return None
