"""``redact_url``: how a URL that may carry credentials is shown (core/redaction.py)."""

from __future__ import annotations

import pytest

from morag.core.redaction import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.example.com/in?token=secret", "https://hooks.example.com/in"),
        ("https://hooks.example.com/in?a=1&sig=secret#frag", "https://hooks.example.com/in"),
        ("https://hooks.example.com/in#access_token=secret", "https://hooks.example.com/in"),
        ("https://user:secret@hooks.example.com/in", "https://hooks.example.com/in"),
        ("https://user:p@ss@hooks.example.com:8443/in?t=s", "https://hooks.example.com:8443/in"),
        ("https://secret@hooks.example.com", "https://hooks.example.com"),
        ("http://hooks.example.com?token=secret", "http://hooks.example.com"),
        ("https://hooks.example.com/a@b/c?t=secret", "https://hooks.example.com/a@b/c"),
        # IDN hosts stay as written, Unicode or punycode
        ("https://bücher.example/hook?token=secret", "https://bücher.example/hook"),
        ("https://u:p@xn--bcher-kva.example/hook#s", "https://xn--bcher-kva.example/hook"),
        # IPv6 literals keep their brackets and port
        ("http://[2001:db8::1]:8080/hook?token=secret", "http://[2001:db8::1]:8080/hook"),
        ("http://u:secret@[::1]:9/hook", "http://[::1]:9/hook"),
        # nothing to hide: unchanged, percent-escapes and all
        ("https://hooks.example.com/in/a%20b", "https://hooks.example.com/in/a%20b"),
        # not a URL httpx would send, still never fails and never leaks
        ("hooks.example.com/in?next=http://x?token=secret", "hooks.example.com/in"),
        ("user:secret@hooks.example.com/in", "hooks.example.com/in"),
        ("http://[::1/hook?token=secret", "http://[::1/hook"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "secret" not in redact_url(url)
