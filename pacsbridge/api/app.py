"""The FastAPI application.  Dependencies (sessions, metrics, the model, the clock) are bound by
:func:`create_app`; nothing is read from module globals.

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

import html
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..imaging import DEFAULT_MAX_DECODED_BYTES
from ..auth.users import Principal
from ..inference.metrics import PipelineMetrics
from ..store import events as audit
from ..store.models import Instance, InstanceState, utcnow
from ..worklist import lifecycle as lc
from ..worklist.items import ALL_STATUSES, list_worklist
from ..worklist.reports import item_detail, list_instances
from ..worklist.viewer import viewer_link
from . import render
from .auth import ADMIN, ANYONE, MONITOR, READERS, Authenticator

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_CLAIM_TIMEOUT_S = 1800.0
#: Image previews rendered at once (each decodes an image: up to max_decoded_bytes of memory).
DEFAULT_MAX_CONCURRENT_RENDERS = 2
#: Database ids are 64-bit signed integers.
MAX_ID = 2**63 - 1
#: No list is that long; a larger offset is a client error, not a database overflow.
MAX_OFFSET = 1_000_000_000

ItemId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="worklist item id")]
InstanceId = Annotated[int, PathParam(ge=1, le=MAX_ID, description="instance id")]


class WorklistEntry(BaseModel):
    id: int
    status: str
    priority: float
    probability: float
    study_instance_uid: str
    accession_number: str | None
    patient_name: str | None
    patient_id: str | None
    patient_age: str | None
    study_date: str | None
    study_description: str | None
    modality: str | None
    requested_priority: str | None
    received_at: str
    first_positive_at: str
    waiting_s: float
    claimed_by: str | None
    claim_expires_at: str | None
    finding: str | None
    completed_by: str | None
    completed_at: str | None
    ups_uid: str
    viewer_url: str | None = None


class CompleteBody(BaseModel):
    finding: Literal["pneumonia", "no_pneumonia", "other"]
    comment: str | None = Field(None, max_length=4000)


class CancelBody(BaseModel):
    reason: str = Field(..., min_length=1, max_length=4000)


#: The HTTP status of each refusal of the life cycle, most specific first; any other refusal is 409
#: (illegal transition, someone else's claim, wrong Transaction UID, expired claim, no finding).
HTTP_STATUS_OF_REFUSAL: tuple[tuple[type[lc.LifecycleError], int], ...] = (
    (lc.ItemNotFound, 404), (lc.InvalidValue, 422), (lc.NotPermitted, 403))


def _status_of(exc: lc.LifecycleError) -> int:
    return next((code for cls, code in HTTP_STATUS_OF_REFUSAL if isinstance(exc, cls)), 409)


class _HeatmapModel:
    """The model for heatmaps: loaded on first use when given as a loader (a copy of its own, not the
    worker's, since Grad-CAM needs gradients and hooks), one heatmap at a time."""

    def __init__(self, model: Any | None) -> None:
        self._model = model
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return self._model is not None

    def grad_cam(self, module: Any, pixels: Any) -> Any:
        with self._lock:
            try:
                if callable(self._model) and not hasattr(self._model, "predict_images"):
                    self._model = self._model()
                return module.grad_cam(self._model, pixels)
            except Exception as exc:  # noqa: BLE001 - a heatmap failure must not take the image route down
                log.exception("heatmap failed")
                raise render.RenderError(503, f"heatmap failed: {type(exc).__name__}: {exc}") from None


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
    replaces ``ready`` with named checks on ``/readyz``."""
    # FastAPI's own /docs and /openapi.json are open to anyone: disabled, re-added behind admin below.
    app = FastAPI(title="pacsbridge", version=__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  description="AI triage of chest radiographs: worklist, instances, statistics. "
                  "Every /api route needs Authorization: Bearer <token> (pacsbridge users add).")
    metrics = metrics or PipelineMetrics(sessions)
    heatmap_model = _HeatmapModel(model)
    auth = Authenticator(sessions)
    admin = auth.require(ADMIN)
    reader = auth.require(*READERS)
    anyone = auth.require(*ANYONE)
    watcher = auth.require(MONITOR, ADMIN)
    render_slots = threading.BoundedSemaphore(max_concurrent_renders)
    app.state.render_slots = render_slots  # tests and operators can see how full it is

    # Client errors: the usual answer, and one line in the log (no traceback, no query string).
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        where = "; ".join(".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", ""))
                          for e in exc.errors()[:3])
        log.info("client error 422 %s %s: %s", request.method, request.url.path, where[:300])
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code < 500:
            log.info("client error %d %s %s: %s", exc.status_code, request.method, request.url.path,
                     str(exc.detail)[:300])
        else:
            log.warning("error %d %s %s: %s", exc.status_code, request.method, request.url.path,
                        str(exc.detail)[:300])
        return await http_exception_handler(request, exc)

    def db_session() -> Iterator[Session]:
        with sessions() as session:
            yield session

    @app.exception_handler(lc.LifecycleError)
    def lifecycle_error(request: Request, exc: lc.LifecycleError) -> JSONResponse:
        log.info("client error %d %s %s: %s", _status_of(exc), request.method, request.url.path, str(exc)[:300])
        body: dict[str, Any] = {"detail": str(exc), "current": exc.current}
        holder = getattr(exc, "holder", None)
        if holder is not None:
            body["holder"] = holder
        return JSONResponse(body, status_code=_status_of(exc))

    def with_viewer(item: dict[str, Any]) -> dict[str, Any]:
        item["viewer_url"] = viewer_link(viewer_url, item["study_instance_uid"], item["accession_number"])
        return item

    def item_json(session: Session, item_id: int, now: Any) -> dict[str, Any]:
        """The one item answer: GET /api/worklist/{id} and every write (claim, release, ...) alike."""
        out = with_viewer(item_detail(session, item_id, now))
        out["heatmap_available"] = heatmap_model.configured and render.heatmap_module() is not None
        return out

    def transition(fn: Callable[..., Any], item_id: int, who: Principal, **kwargs: Any) -> dict[str, Any]:
        actor = lc.Actor(who.name, who.role)
        now = clock()
        with sessions.begin() as session:
            fn(session, item_id, actor, now=now, **kwargs)
        with sessions() as session:
            return item_json(session, item_id, now)

    # -- open --------------------------------------------------------------------------------------
    @app.get("/healthz", include_in_schema=True, tags=["health"])
    def healthz() -> Response:
        """Liveness: the process answers and the database responds (no token needed)."""
        try:
            with sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001
            log.warning("healthz: database check failed: %s", type(exc).__name__)
            return JSONResponse({"status": "error", "database": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", tags=["health"])
    def readyz() -> Response:
        """Readiness: every named check passes (no token needed); 503 lists the failing ones."""
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
        res = healthz()
        if res.status_code != 200:
            return res
        if ready is not None and not ready():
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={
            "Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
            # Only our own script/style; images from blob: URLs made by the page after an authenticated fetch.
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                                       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        # Browsers ask for /favicon.ico whatever the page says: answer with the page's icon, not a 404.
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml",
                            headers={"Cache-Control": "public, max-age=86400"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # -- admin and monitoring ----------------------------------------------------------------------
    @app.get("/metrics", tags=["monitoring"], dependencies=[Depends(watcher)])
    def prometheus() -> Response:
        """Prometheus metrics (monitor, admin)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(admin)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(admin)])
    def docs() -> HTMLResponse:
        """A self-contained route list from the OpenAPI schema (no CDN: hospitals are often offline)."""
        rows = []
        for path, ops in app.openapi()["paths"].items():
            for method, op in ops.items():
                params = ", ".join(p["name"] for p in op.get("parameters", []))
                rows.append(f"<tr><td><b>{method.upper()}</b></td><td><code>{html.escape(path)}</code></td>"
                            f"<td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(params)}</td>"
                            f"<td>{html.escape((op.get('description') or '').splitlines()[0] if op.get('description') else '')}</td></tr>")
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>pacsbridge API</title>"
            "<style>body{font:15px system-ui;margin:2em}td{padding:4px 10px;border-bottom:1px solid #ccc}</style>"
            f"<h1>pacsbridge {html.escape(__version__)} API</h1><p>Full schema: <code>/openapi.json</code>. "
            "Every /api route needs <code>Authorization: Bearer &lt;token&gt;</code>.</p>"
            f"<table><tr><th>method</th><th>path</th><th>summary</th><th>parameters</th><th></th></tr>{''.join(rows)}</table>")

    @app.get("/api/me", tags=["accounts"])
    def me(who: Principal = Depends(anyone)) -> dict[str, str]:
        """Who the token belongs to (name and role), and the mode (``live`` or ``shadow``) for the page's banner."""
        return {"name": who.name, "role": who.role, "mode": mode}

    # -- worklist ----------------------------------------------------------------------------------
    @app.get("/api/worklist", response_model=list[WorklistEntry], tags=["worklist"], dependencies=[Depends(reader)])
    def worklist(
        status: str = Query("open", max_length=16, description="scheduled|in_progress|completed|canceled|all; "
                            "default open = scheduled + in_progress"),
        limit: int = Query(200, ge=1, le=5000), offset: int = Query(0, ge=0, le=MAX_OFFSET),
        session: Session = Depends(db_session),
    ) -> list[dict[str, Any]]:
        """Items in reading order (highest priority first)."""
        if status != "open" and status != "all" and status not in ALL_STATUSES:
            raise HTTPException(422, f"status must be one of {', '.join(ALL_STATUSES)}, all or open")
        return [with_viewer(it) for it in list_worklist(
            session, status=None if status == "open" else status, limit=limit, offset=offset, now=clock())]

    @app.get("/api/worklist/{item_id}", tags=["worklist"], dependencies=[Depends(reader)])
    def worklist_item(item_id: ItemId, session: Session = Depends(db_session)) -> dict[str, Any]:
        """One item with its instances, each prediction (probability, threshold, model), image links and history."""
        return item_json(session, item_id, clock())

    @app.post("/api/worklist/{item_id}/claim", tags=["worklist"])
    def claim(item_id: ItemId, who: Principal = Depends(reader)) -> dict[str, Any]:
        """Claim the item for reading (409 with the holder when someone else has it; again = renew)."""
        return transition(lc.claim, item_id, who, claim_timeout_s=claim_timeout_s)

    @app.post("/api/worklist/{item_id}/release", tags=["worklist"])
    def release(item_id: ItemId, who: Principal = Depends(reader)) -> dict[str, Any]:
        """Give the item back to the queue (the claimant or an admin)."""
        return transition(lc.release, item_id, who)

    @app.post("/api/worklist/{item_id}/complete", tags=["worklist"])
    def complete(item_id: ItemId, body: CompleteBody, who: Principal = Depends(reader)) -> dict[str, Any]:
        """Record the finding (the claimant or an admin; 409 otherwise)."""
        return transition(lc.complete, item_id, who, finding=body.finding, comment=body.comment)

    @app.post("/api/worklist/{item_id}/cancel", tags=["worklist"])
    def cancel(item_id: ItemId, body: CancelBody, who: Principal = Depends(admin)) -> dict[str, Any]:
        """Withdraw the item with a reason (admin)."""
        return transition(lc.cancel, item_id, who, reason=body.reason)

    # -- instances ---------------------------------------------------------------------------------
    @app.get("/api/instances", tags=["instances"], dependencies=[Depends(reader)])
    def instances(
        study_instance_uid: str | None = Query(None, max_length=64), state: InstanceState | None = Query(None),
        limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET),
        since: str | None = Query(None, max_length=40, description="received at or after: ISO date/time or 24h, 7d"),
        until: str | None = Query(None, max_length=40, description="received before: ISO date/time"),
        session: Session = Depends(db_session),
    ) -> list[dict[str, Any]]:
        """Every received instance (newest first): state, probability, positive flag, reason when refused
        (``not_analysed``) or failed (with ``attempts``, ``next_attempt_at``, ``last_error``)."""
        try:
            after = audit.parse_since(since, clock()) if since else None
            before = audit.parse_since(until, clock()) if until else None
        except ValueError as exc:
            raise HTTPException(422, f"since/until: {exc}") from None
        return list_instances(session, study_instance_uid=study_instance_uid,
                              state=state.value if state else None, limit=limit, offset=offset,
                              received_from=after, received_before=before)

    @app.get("/api/instances/{instance_id}/image.png", tags=["instances"], dependencies=[Depends(reader)],
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    def image(instance_id: InstanceId, size: int = Query(512, ge=64, le=2048),
              overlay: Literal["heatmap"] | None = Query(None)) -> Response:
        """The image as the model saw it (same decoder and window), labelled NOT FOR DIAGNOSTIC USE;
        ``overlay=heatmap`` adds the model's attention map when the model provides one.  The image is
        decoded within ``max_decoded_bytes`` (422 with the reason beyond it); 503 when
        ``max_concurrent_renders`` previews are already being made."""
        if spool_dir is None:
            raise HTTPException(404, "this server has no spool folder configured")
        with sessions() as session:
            inst = session.scalar(select(Instance).where(Instance.id == instance_id))
        if inst is None:
            raise HTTPException(404, f"instance {instance_id} does not exist")
        if inst.spool_deleted_at is not None:
            raise HTTPException(410, f"instance {instance_id}: the file was deleted by retention")
        heat_mod = None
        if overlay == "heatmap":
            heat_mod = render.heatmap_module()
            if heat_mod is None:
                raise HTTPException(404, "heatmap not available: this model provides no attention heatmap yet")
            if not heatmap_model.configured:
                raise HTTPException(404, "heatmap not available: no model is loaded in this server process")
        if not render_slots.acquire(blocking=False):
            raise HTTPException(503, f"{max_concurrent_renders} image preview(s) are being made already "
                                "(max_concurrent_renders); try again in a moment", headers={"Retry-After": "2"})
        try:
            path = render.spool_file(spool_dir, inst.file_path)
            # The heatmap needs the model's own input; the plain picture may use more resolution.
            pixels = (render.decoded_image(path, max_decoded_bytes=max_decoded_bytes) if heat_mod is not None
                      else render.decoded_image(path, size, max_decoded_bytes=max_decoded_bytes))
            heat = heatmap_model.grad_cam(heat_mod, pixels) if heat_mod is not None else None
            png = render.to_png(pixels, size, heat=heat, overlay=getattr(heat_mod, "overlay_rgb", None))
        except render.RenderError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        finally:
            render_slots.release()
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    # -- statistics --------------------------------------------------------------------------------
    # The live figures aggregate the whole history (about 0.5 s with 100,000 predictions on SQLite):
    # a dashboard polling every few seconds gets figures at most ``stats_cache_s`` old instead.
    stats_cache: dict[str, tuple[float, dict[str, Any]]] = {}
    stats_lock = threading.Lock()

    def live_figures(session: Session, start: Any) -> dict[str, Any]:
        from ..validation.live import live_stats

        key = start.isoformat(timespec="minutes") if start is not None else ""
        with stats_lock:
            hit = stats_cache.get(key)
            if hit is not None and time.monotonic() - hit[0] < stats_cache_s:
                return hit[1]
        fresh = live_stats(session, start, clock())
        with stats_lock:
            if len(stats_cache) > 32:
                stats_cache.clear()
            stats_cache[key] = (time.monotonic(), fresh)
        return fresh

    @app.get("/api/stats", tags=["stats"], dependencies=[Depends(anyone)])
    def stats(
        session: Session = Depends(db_session),
        since: str | None = Query(None, max_length=40, description="start of the window: ISO date/time or 90m, "
                                  "24h, 7d (default: the last 30 days); the figures in total are always there"),
    ) -> dict[str, Any]:
        """Per model and calibration, in total and over the window: scored, flagged, completed per finding,
        PPV with its Wilson 95 % interval, sensitivity and NPV from RIS labels, receipt-to-completion p50/p95;
        refusals by reason; label counts; the mode (live or shadow)."""
        try:
            start = audit.parse_since(since, clock()) if since else None
        except ValueError as exc:
            raise HTTPException(422, f"since: {exc}") from None
        out = {**live_figures(session, start), "mode": mode}
        # drift: a pacsbridge.validation.drift.DriftMonitor (the daemon's); none in bare test apps.
        out["drift"] = drift.status(session, clock()) if drift is not None else \
            {"alarm": False, "reference": None, "signals": []}
        return out

    @app.get("/api/stats/weekly", tags=["stats"], dependencies=[Depends(anyone)])
    def stats_weekly(session: Session = Depends(db_session), weeks: int = Query(12, ge=1, le=104)) -> dict[str, Any]:
        """Per ISO week (UTC) and model: scored, flag rate, refusal rate, PPV and sensitivity with Wilson 95 %
        intervals and n; null where a week has no data (the Statistics page's charts)."""
        from ..validation.weekly import weekly_figures

        return weekly_figures(session, weeks, clock())

    # -- audit trail -------------------------------------------------------------------------------
    @app.get("/api/events", tags=["admin"], dependencies=[Depends(admin)])
    def events(
        kind: str | None = Query(None, max_length=32, description="only this kind, e.g. association_rejected"),
        since: str | None = Query(None, max_length=40, description="ISO date/time or a duration back (24h, 7d)"),
        limit: int = Query(audit.DEFAULT_LIMIT, ge=1, le=audit.MAX_LIMIT),
        session: Session = Depends(db_session),
    ) -> list[dict[str, Any]]:
        """The audit trail, newest first: at, kind, level, actor, detail (admin)."""
        try:
            after = audit.parse_since(since, clock()) if since else None
        except ValueError as exc:
            raise HTTPException(422, f"since: {exc}") from None
        return audit.list_events(session, kind=kind, since=after, limit=limit)

    return app
