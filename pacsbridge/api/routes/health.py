"""``/healthz`` (liveness) and ``/readyz`` (readiness): open, no token."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..deps import Sessions

log = logging.getLogger("pacsbridge.api.app")
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(sessions: Sessions) -> Response:
    """Liveness: the process answers and the database responds (no token needed)."""
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        log.warning("healthz: database check failed: %s", type(exc).__name__)
        return JSONResponse({"status": "error", "database": type(exc).__name__}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
def readyz(request: Request, sessions: Sessions) -> Response:
    """Readiness: every named check passes (no token needed); 503 lists the failing ones."""
    readiness, ready = request.app.state.readiness, request.app.state.ready
    if readiness is not None:
        try:
            checks = readiness()
        except Exception as exc:  # noqa: BLE001 - a check that cannot run is not ready
            log.warning("readyz: checks failed to run: %s", type(exc).__name__)
            return JSONResponse({"status": "not ready", "failing": ["readiness"], "checks": {}}, status_code=503)
        failing = [c.name for c in checks if not c.ok]
        body = {"status": "not ready" if failing else "ready", "failing": failing,
                "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks}}
        return JSONResponse(body, status_code=503 if failing else 200)
    res = healthz(sessions)
    if res.status_code != 200:
        return res
    if ready is not None and not ready():
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse({"status": "ready"})
