"""What a morag task message's publish asks of Celery (core/broker.py)."""

from __future__ import annotations

from morag.core.broker import REPR_LIMIT, publish_options, short_repr


def test_arguments_are_shown_as_their_repr_cut_at_celerys_limit() -> None:
    small = {"url": "https://example.org/a", "metadata": {}}
    assert short_repr(small) == repr(small)
    long = {"url": "https://example.org/" + "a" * 5000}
    shown = short_repr(long)
    assert len(shown) == REPR_LIMIT and shown.endswith("...")
    assert shown.startswith("{'url': 'https://example.org/aaa")


def test_publish_options_show_the_arguments_and_declare_nothing() -> None:
    assert publish_options(None, None) == {"argsrepr": "()", "kwargsrepr": "{}", "declare": []}
    options = publish_options(["a.pdf"], {"steps": 2})
    assert options["argsrepr"] == "('a.pdf',)" and options["kwargsrepr"] == "{'steps': 2}"
