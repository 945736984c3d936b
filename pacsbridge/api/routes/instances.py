"""``/api/instances``: received instances and their outcome, and each one's image as the model saw it."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from sqlalchemy import select

from ...store import events as audit
from ...store.models import Instance, InstanceState
from ...worklist.audit import blinded_instance
from ...worklist.reports import list_instances
from .. import render
from ..auth import reader
from ..deps import MAX_OFFSET, Config, DbSession, Heatmaps, InstanceId, Now

router = APIRouter(tags=["instances"], dependencies=[Depends(reader)])


@router.get("/api/instances")
def instances(
    session: DbSession, now: Now,
    study_instance_uid: str | None = Query(None, max_length=64), state: InstanceState | None = Query(None),
    limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_OFFSET),
    since: str | None = Query(None, max_length=40, description="received at or after: ISO date/time or 24h, 7d"),
    until: str | None = Query(None, max_length=40, description="received before: ISO date/time"),
) -> list[dict[str, Any]]:
    """Every received instance (newest first): state, probability, positive flag, reason when refused
    (``not_analysed``) or failed (with ``attempts``, ``next_attempt_at``, ``last_error``)."""
    try:
        after = audit.parse_since(since, now) if since else None
        before = audit.parse_since(until, now) if until else None
    except ValueError as exc:
        raise HTTPException(422, f"since/until: {exc}") from None
    return list_instances(session, study_instance_uid=study_instance_uid,
                          state=state.value if state else None, limit=limit, offset=offset,
                          received_from=after, received_before=before)


@router.get("/api/instances/{instance_id}/image.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def image(request: Request, instance_id: InstanceId, config: Config, heat: Heatmaps,
          size: int = Query(512, ge=64, le=2048), overlay: Literal["heatmap"] | None = Query(None)) -> Response:
    """The image as the model saw it (same decoder and window), labelled NOT FOR DIAGNOSTIC USE;
    ``overlay=heatmap`` adds the model's attention map when the model provides one.  The image is
    decoded within ``max_decoded_bytes`` (422 with the reason beyond it); 503 when
    ``max_concurrent_renders`` previews are already being made."""
    if config.spool_dir is None:
        raise HTTPException(404, "this server has no spool folder configured")
    with request.app.state.sessions() as session:
        inst = session.scalar(select(Instance).where(Instance.id == instance_id))
    if inst is None:
        raise HTTPException(404, f"instance {instance_id} does not exist")
    if inst.spool_deleted_at is not None:
        raise HTTPException(410, f"instance {instance_id}: the file was deleted by retention")
    heat_mod = None
    if overlay == "heatmap":
        with request.app.state.sessions() as session:
            if blinded_instance(session, instance_id):
                raise HTTPException(403, "heatmap hidden: this image belongs to a quality-audit read that is "
                                    "not completed yet (blinded)")
        heat_mod = render.heatmap_module()
        if heat_mod is None:
            raise HTTPException(404, "heatmap not available: this model provides no attention heatmap yet")
        if not heat.configured:
            raise HTTPException(404, "heatmap not available: no model is loaded in this server process")
    slots = request.app.state.render_slots
    if not slots.acquire(blocking=False):
        raise HTTPException(503, f"{config.max_concurrent_renders} image preview(s) are being made already "
                            "(max_concurrent_renders); try again in a moment", headers={"Retry-After": "2"})
    try:
        png = _render(config.spool_dir, inst.file_path, size, config.max_decoded_bytes, heat, heat_mod)
    except render.RenderError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    finally:
        slots.release()
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def _render(spool_dir: Any, rel: str, size: int, max_decoded_bytes: int, heat: Any, heat_mod: Any) -> bytes:
    path = render.spool_file(spool_dir, rel)
    # The heatmap needs the model's own input; the plain picture may use more resolution.
    pixels = (render.decoded_image(path, max_decoded_bytes=max_decoded_bytes) if heat_mod is not None
              else render.decoded_image(path, size, max_decoded_bytes=max_decoded_bytes))
    cam = heat.grad_cam(heat_mod, pixels) if heat_mod is not None else None
    return render.to_png(pixels, size, heat=cam, overlay=getattr(heat_mod, "overlay_rgb", None))
