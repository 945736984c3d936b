"""The FastAPI application.  Dependencies (sessions, metrics, the auth check) are bound by
:func:`create_app`; nothing is read from module globals.

Routes:
  GET /api/worklist  the worklist in priority order (same fields as ``pacsbridge worklist --json``)
  GET /healthz       200 {"status": "ok"} when the database answers, else 503
  GET /metrics       Prometheus text format
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from .. import __version__
from ..inference.metrics import PipelineMetrics
from ..worklist.items import list_worklist

log = logging.getLogger(__name__)


class WorklistEntry(BaseModel):
    study_instance_uid: str
    priority: float
    probability: float
    status: str
    received_at: str


def allow_all(request: Request) -> None:
    """The authorization hook: every route depends on it.  Today it allows everything (the API is
    read-only and meant for the hospital network); replace it via ``create_app(authorize=...)`` with a
    check that raises ``HTTPException(401/403)``."""
    return None


def create_app(
    sessions: sessionmaker[Session], metrics: PipelineMetrics | None = None,
    authorize: Callable[..., Any] = allow_all,
) -> FastAPI:
    app = FastAPI(title="pacsbridge", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = metrics or PipelineMetrics(sessions)

    def db_session() -> Iterator[Session]:
        with sessions() as session:
            yield session

    @app.get("/api/worklist", response_model=list[WorklistEntry], dependencies=[Depends(authorize)])
    def worklist(include_completed: bool = False, session: Session = Depends(db_session)) -> list[dict[str, Any]]:
        return list_worklist(session, include_completed=include_completed)

    @app.get("/healthz", dependencies=[Depends(authorize)])
    def healthz() -> Response:
        try:
            with sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001
            log.warning("healthz: database check failed: %s", type(exc).__name__)
            return JSONResponse({"status": "error", "database": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[Depends(authorize)])
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
