"""How a URL that may carry credentials is shown: in logs, job history and API answers."""

from __future__ import annotations

import re

# scheme (optional), authority, path; the query and fragment are what is left
_PARTS = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)?([^/?#]*)([^?#]*)")


def redact_url(url: str) -> str:
    """``url`` without its user info, query and fragment, where tokens travel.

    Plain string surgery, no parsing: it never fails, and the host (an IDN, a bracketed
    IPv6 address), port and path stay exactly as written. The authority ends at the first
    ``/``, ``?`` or ``#``, as httpx (which sends the request) reads it.
    """
    match = _PARTS.match(url)
    assert match is not None  # every part is optional: any text matches
    scheme, authority, path = match.groups(default="")
    return f"{scheme}{authority.rpartition('@')[2]}{path}"
