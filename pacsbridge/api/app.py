"""The FastAPI application: :func:`create_app` keeps what the routes depend on (sessions, the clock,
the heatmap service, the settings, metrics) on ``app.state`` (pacsbridge/api/deps.py) and includes
one router per area (pacsbridge/api/routes/); nothing is read from module globals.

Every route but ``/healthz``, ``/readyz`` and the static web page needs ``Authorization: Bearer
<token>`` (401 when missing, unknown or revoked) and a role (403):

  GET  /                                   web page (static; it signs in with a token)
  GET  /healthz, /readyz                   open: liveness, and readiness (database answers)
  GET  /metrics                            monitor, admin: Prometheus text format
  GET  /openapi.json, /docs                admin
  GET  /api/me                             anyone signed in: name and role
  GET  /api/worklist                       radiologist, admin: items in priority order
  GET  /api/worklist/{id}                  radiologist, admin: item, instances, predictions, history
  POST /api/worklist/{id}/claim|release|complete    radiologist, admin
  POST /api/worklist/{id}/cancel           admin
  GET  /api/instances                      radiologist, admin: received instances and their outcome
  GET  /api/instances/{id}/image.png       radiologist, admin: the image as the model saw it
  GET  /api/stats                          monitor, radiologist, admin: per-model statistics
  GET  /api/stats/weekly                   monitor, radiologist, admin: the same per ISO week (charts)
  GET  /api/events                         admin: the audit trail, newest first (kind, since, limit)

Ids in paths are 1 to 2**63-1 (a larger or smaller one is 422, an unknown one 404), limits and offsets
are bounded: a client error is a 4xx answer and one log line, never a 500 or a traceback.  Image
previews decode through the same size guard as the worker (``max_decoded_bytes``) and at most
``max_concurrent_renders`` run at once (503 with a reason beyond that).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker

from .. import __version__
from ..imaging import DEFAULT_MAX_DECODED_BYTES
from ..inference.metrics import PipelineMetrics
from ..store.models import utcnow
from .deps import (
    DEFAULT_CLAIM_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENT_RENDERS,
    MAX_ID,
    MAX_OFFSET,
    ApiSettings,
    HeatmapService,
)
from .errors import install_error_handlers
from .routes import ROUTERS
from .routes.stats import StatsCache
from .routes.web import STATIC_DIR

__all__ = ["DEFAULT_CLAIM_TIMEOUT_S", "MAX_ID", "MAX_OFFSET", "create_app"]


def create_app(
    sessions: sessionmaker[Session], metrics: PipelineMetrics | None = None, *,
    claim_timeout_s: float = DEFAULT_CLAIM_TIMEOUT_S, spool_dir: Path | None = None,
    model: Any | None = None, clock: Callable[[], Any] = utcnow,
    ready: Callable[[], bool] | None = None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    max_concurrent_renders: int = DEFAULT_MAX_CONCURRENT_RENDERS, viewer_url: str = "",
    readiness: Callable[[], list[Any]] | None = None,
    mode: str = "live", drift: Any | None = None, stats_cache_s: float = 10.0,
) -> FastAPI:
    """The API.  ``model`` (a LoadedModel, or a function that loads one on first use) is used only for
    heatmaps; ``ready`` adds a readiness check; ``max_decoded_bytes`` and ``max_concurrent_renders``
    bound what image previews may cost; ``viewer_url`` is the site's viewer link template
    (pacsbridge.worklist.viewer); ``readiness`` (pacsbridge.health.Check objects, from the daemon)
    replaces ``ready`` with named checks on ``/readyz``; ``drift`` is the daemon's DriftMonitor."""
    # FastAPI's own /docs and /openapi.json are open to anyone: disabled, re-added behind admin (routes/admin.py).
    app = FastAPI(title="pacsbridge", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  description="AI triage of chest radiographs: worklist, instances, statistics. "
                  "Every /api route needs Authorization: Bearer <token> (pacsbridge users add).")
    state = app.state
    state.sessions, state.clock = sessions, clock
    state.settings = ApiSettings(claim_timeout_s=claim_timeout_s, spool_dir=spool_dir,
                                 max_decoded_bytes=max_decoded_bytes, max_concurrent_renders=max_concurrent_renders,
                                 viewer_url=viewer_url, mode=mode, stats_cache_s=stats_cache_s)
    state.metrics = metrics or PipelineMetrics(sessions)
    state.heatmaps = HeatmapService.for_model(model)
    state.render_slots = threading.BoundedSemaphore(max_concurrent_renders)  # tests and operators see how full
    state.stats_cache = StatsCache(stats_cache_s)
    state.ready, state.readiness, state.drift = ready, readiness, drift
    install_error_handlers(app)
    for router in ROUTERS:
        # The routes themselves (with their router's tags and dependencies), not a lazy include:
        # app.routes then lists every route, for the checks that walk it.
        app.router.routes.extend(router.routes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
