"""What monitors are shown of a submission's arguments (services/ingestion/publisher.py)."""

from __future__ import annotations

from morag.services.ingestion.publisher import REPR_LIMIT, short_repr


def test_arguments_are_shown_as_their_repr_cut_at_celerys_limit() -> None:
    small = {"url": "https://example.org/a", "metadata": {}}
    assert short_repr(small) == repr(small)
    long = {"url": "https://example.org/" + "a" * 5000}
    shown = short_repr(long)
    assert len(shown) == REPR_LIMIT and shown.endswith("...")
    assert shown.startswith("{'url': 'https://example.org/aaa")
