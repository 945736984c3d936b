"""Monitoring (``/metrics``), the API's own description (``/openapi.json``, ``/docs``: admin) and
``/api/me``."""

from __future__ import annotations

import html

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ... import __version__
from ...auth.users import Principal
from ..auth import admin, anyone, watcher
from ..deps import Config

router = APIRouter()


@router.get("/metrics", tags=["monitoring"], dependencies=[Depends(watcher)])
def prometheus(request: Request) -> Response:
    """Prometheus metrics (monitor, admin)."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/openapi.json", include_in_schema=False, dependencies=[Depends(admin)])
def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs", include_in_schema=False, dependencies=[Depends(admin)])
def docs(request: Request) -> HTMLResponse:
    """A self-contained route list from the OpenAPI schema (no CDN: hospitals are often offline)."""
    rows = []
    for path, ops in request.app.openapi()["paths"].items():
        for method, op in ops.items():
            params = ", ".join(p["name"] for p in op.get("parameters", []))
            first = (op.get("description") or "").splitlines()[0] if op.get("description") else ""
            rows.append(f"<tr><td><b>{method.upper()}</b></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(params)}</td>"
                        f"<td>{html.escape(first)}</td></tr>")
    return HTMLResponse(
        "<!doctype html><meta charset=utf-8><title>pacsbridge API</title>"
        '<link rel="stylesheet" href="/static/docs.css">'
        f"<h1>pacsbridge {html.escape(__version__)} API</h1><p>Full schema: <code>/openapi.json</code>. "
        "Every /api route needs <code>Authorization: Bearer &lt;token&gt;</code>.</p>"
        f"<table><tr><th>method</th><th>path</th><th>summary</th><th>parameters</th><th></th></tr>{''.join(rows)}</table>")


@router.get("/api/me", tags=["accounts"])
def me(config: Config, who: Principal = Depends(anyone)) -> dict[str, str]:
    """Who the token belongs to (name and role), and the mode (``live`` or ``shadow``) for the page's banner."""
    return {"name": who.name, "role": who.role, "mode": config.mode}
