"""The web page (static files; it signs in with a token)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..security import CSP

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    # The page carries the one policy even in an app without the security middleware.
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={
        "Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": CSP})


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    # Browsers ask for /favicon.ico whatever the page says: answer with the page's icon, not a 404.
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml",
                        headers={"Cache-Control": "public, max-age=86400"})
