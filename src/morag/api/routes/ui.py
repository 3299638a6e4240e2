"""The dashboard (``/ui``): a static page and a script that read the API like any client.

The page holds no data and needs no key: the script asks for the key when the API does,
keeps it in the tab's session storage and sends it in a header. Assets are served from
this package (no CDN: it works offline); a strict Content-Security-Policy allows nothing
but them.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from morag.core.errors import NotFoundError

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
_MEDIA_TYPES = {
    "app.js": "text/javascript",
    "app.css": "text/css",
}
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/ui")
def dashboard_redirect() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/")
def dashboard() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html", headers=_HEADERS)


@router.get("/ui/{name}")
def asset(name: str) -> FileResponse:
    if name not in _MEDIA_TYPES:
        raise NotFoundError(f"no dashboard file named {name}")
    return FileResponse(UI_DIR / name, media_type=_MEDIA_TYPES[name], headers=_HEADERS)
