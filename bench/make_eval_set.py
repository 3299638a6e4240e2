"""Build the retrieval evaluation set from the Python documentation's general index.

Judgements made by others: the index of the Python documentation (written by its
authors, rendered by Sphinx) maps each index phrase to the place that documents it. We
query with the phrase and count a hit when it lands in that place.

Source, exactly: Debian 12's ``python3.11-doc`` package, version 3.11.2-6+deb12u9
(``apt-get install python3.11-doc``), files under /usr/share/doc/python3.11/html:
``genindex-all.html`` (the whole general index) and pages of ``library/``. The script
refuses another version unless ``--any-version`` (anchors and sections move between
releases, and the committed set must stay the one it was made from).

Steps (all deterministic; ``random.Random(SEED)``):

1. Index entries: every ``<li>`` of the index table; a top-level entry's phrase is its
   text, a sub-entry's is "parent sub" ("JSON module"), as a reader would look it up
   (a parenthesised sub-entry qualifies the parent's bare name: "write_eof()
   (asyncio.WriteTransport method)").
   Every link of the entry (``[1]``, ``[2]`` ...) is a target. Phrases with fewer than
   three letters ("!=", "%") are dropped.
2. Pages: the library pages with at least ``MIN_ENTRIES`` index entries pointing in,
   shuffled, taken while the chunks morag's chunker makes of them (512 tokens) stay
   within ``--chunk-budget`` (ingestion through the API under ~10 minutes on 2 cores).
3. Targets: each link's anchor is resolved in its page to the innermost ``<section>``
   that holds it (an anchor on an empty ``<span class="target">`` right before a
   section belongs to that section, as Sphinx places them). A target records the page
   (``source``, the file name ingested), the anchor, and the section's id path and
   title path from the page's top section down.
4. Queries: the entries with at least one target inside the chosen pages (their targets
   outside the pages are dropped), ``--queries`` of them sampled.

    python -m bench.make_eval_set            # writes bench/data/python-docs-eval.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import subprocess
from collections import defaultdict
from pathlib import Path
from typing import Any

from lxml import html as lxml_html

from bench.infra import ROOT

DOCS = Path("/usr/share/doc/python3.11/html")
PACKAGE, VERSION = "python3.11-doc", "3.11.2-6+deb12u9"
OUT = ROOT / "bench" / "data" / "python-docs-eval.json"
SEED = 14
MIN_ENTRIES = 8
_LETTERS = re.compile(r"[A-Za-z]")
_QUALIFIER = re.compile(r"\s*\([^()]*\)$")


def package_version() -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", PACKAGE], capture_output=True, text=True
    )
    return out.stdout.strip()


def _text(element: Any) -> str:
    return " ".join(element.text_content().split())


def index_entries(genindex: Path) -> list[tuple[str, list[str]]]:
    """(phrase, [href ...]) of every entry and sub-entry of the general index."""
    tree = lxml_html.parse(str(genindex))
    entries: list[tuple[str, list[str]]] = []
    for table in tree.getroot().find_class("indextable"):
        for top in table.xpath("./tr/td/ul/li"):
            own = "".join(top.xpath("./text()")).strip()
            links = top.xpath("./a")
            phrase = " ".join((_text(links[0]) if links else own).split())
            if links:
                entries.append((phrase, [a.get("href") for a in links]))
            # Sphinx merges an entry's first sub-entry into the top line ("f() (a method)",
            # then "(b method)" below): the others qualify the bare name, not that line.
            bare = _QUALIFIER.sub("", phrase) if links else phrase
            for sub in top.xpath("./ul/li"):
                sub_links = sub.xpath("./a")
                if sub_links:
                    sub_text = _text(sub_links[0])
                    parent = bare if sub_text.startswith("(") else phrase
                    entries.append((f"{parent} {sub_text}", [a.get("href") for a in sub_links]))
    return [(p, hrefs) for p, hrefs in entries if len(_LETTERS.findall(p)) >= 3]


def _heading_title(section: Any) -> str:
    for child in section:
        if child.tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            for link in child.find_class("headerlink"):
                link.drop_tree()
            return _text(child)
    return ""


def section_of(page: Any, anchor: str) -> tuple[list[str], list[str]] | None:
    """(section ids, section titles) from the top section to the one holding ``anchor``."""
    found = page.xpath("//*[@id=$a]", a=anchor)
    if not found:
        return None
    element = found[0]
    if element.tag != "section":
        following = element.getnext()
        empty = not _text(element) and len(element) == 0
        if empty and following is not None and following.tag == "section":
            element = following
    sections = [e for e in [element, *element.iterancestors()] if e.tag == "section"]
    if not sections:
        return None
    sections.reverse()
    return [s.get("id") for s in sections], [_heading_title(s) for s in sections]


def count_chunks(path: Path) -> int:
    from morag.processors.document import process_document

    return len(process_document(path).chunks)


def build(chunk_budget: int, queries: int) -> dict[str, Any]:
    entries = index_entries(DOCS / "genindex-all.html")
    per_page: dict[str, int] = defaultdict(int)
    for _, hrefs in entries:
        for href in hrefs:
            page = href.split("#")[0]
            if page.startswith("library/"):
                per_page[page] += 1
    rng = random.Random(SEED)
    candidates = sorted(p for p, n in per_page.items() if n >= MIN_ENTRIES)
    rng.shuffle(candidates)
    pages: dict[str, int] = {}
    total = 0
    for page in candidates:
        chunks = count_chunks(DOCS / page)
        if total + chunks <= chunk_budget:
            pages[page] = chunks
            total += chunks
    trees = {page: lxml_html.parse(str(DOCS / page)).getroot() for page in pages}
    judged = []
    for phrase, hrefs in entries:
        targets = []
        for href in hrefs:
            page, _, anchor = href.partition("#")
            if page not in trees or not anchor:
                continue
            place = section_of(trees[page], anchor)
            if place is None:
                continue
            ids, titles = place
            target = {
                "source": Path(page).name,
                "anchor": anchor,
                "section_ids": ids,
                "section_titles": titles,
            }
            if target not in targets:
                targets.append(target)
        if targets:
            judged.append({"query": phrase, "targets": targets})
    sample = sorted(rng.sample(range(len(judged)), min(queries, len(judged))))
    return {
        "package": PACKAGE,
        "version": VERSION,
        "root": str(DOCS),
        "index": "genindex-all.html",
        "seed": SEED,
        "made_by": "bench/make_eval_set.py",
        "pages": [
            {
                "path": page,
                "source": Path(page).name,
                "chunks": n,
                "sha256": hashlib.sha256((DOCS / page).read_bytes()).hexdigest(),
            }
            for page, n in sorted(pages.items())
        ],
        "queries": [{"id": i, **judged[j]} for i, j in enumerate(sample)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk-budget", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=800)
    parser.add_argument("--any-version", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    found = package_version()
    if found != VERSION and not args.any_version:
        raise SystemExit(
            f"{PACKAGE} {found or 'is not installed'}; this set is made from "
            f"{VERSION} (apt-get install {PACKAGE}; or --any-version)"
        )
    data = build(args.chunk_budget, args.queries)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    targets = sum(len(q["targets"]) for q in data["queries"])
    print(
        f"{len(data['pages'])} pages ({sum(p['chunks'] for p in data['pages'])} chunks), "
        f"{len(data['queries'])} queries, {targets} targets -> {args.out}"
    )


if __name__ == "__main__":
    main()
