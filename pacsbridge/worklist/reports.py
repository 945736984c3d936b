"""Read-only views shared by the HTTP API and the CLI: one item with its evidence, received
instances with their outcome (why a study was or was not flagged).  Per-model statistics are
pacsbridge.validation.live."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..store.models import Event, Instance, Prediction, Series, Study, WorklistItem, WorklistStatus, utcnow
from ..store.reasons import reasons_from_row
from . import audit
from .history import study_history
from .items import fetch_rows, item_row, row_query
from .lifecycle import ItemNotFound

#: Most instances one listing returns.
MAX_INSTANCES = 1000


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def instance_row(inst: Instance, series: Series, study: Study, pred: Prediction | None) -> dict[str, Any]:
    return {
        "id": inst.id,
        "sop_instance_uid": inst.sop_instance_uid,
        "study_instance_uid": study.study_instance_uid,
        "series_instance_uid": series.series_instance_uid,
        "modality": series.modality,
        "calling_ae": inst.calling_ae,
        "received_at": _iso(inst.received_at),
        "state": inst.state,
        "reason": inst.state_reason,
        "reasons": reasons_from_row(inst.state_reason, inst.state_reasons),
        "attempts": inst.attempts,
        "next_attempt_at": _iso(inst.next_attempt_at),
        "last_error": inst.last_error,
        "probability": round(pred.probability, 6) if pred else None,
        "positive": pred.positive if pred else None,
        "threshold": pred.threshold if pred else None,
        "ood_score": pred.ood_score if pred else None,
        "model_id": pred.model_id if pred else None,
        "calibration": pred.calibration if pred else None,
        "predicted_at": _iso(pred.created_at) if pred else None,
        "file_kept": inst.spool_deleted_at is None,
        "image_url": f"/api/instances/{inst.id}/image.png",
    }


def list_instances(session: Session, *, study_instance_uid: str | None = None, state: str | None = None,
                   limit: int = 100, offset: int = 0, received_from: datetime | None = None,
                   received_before: datetime | None = None) -> list[dict[str, Any]]:
    """Received instances, newest first, with their state and prediction (or refusal reason);
    ``received_from`` / ``received_before``: only those received in [from, before)."""
    q = (select(Instance, Series, Study, Prediction)
         .join(Series, Series.id == Instance.series_id).join(Study, Study.id == Series.study_id)
         .outerjoin(Prediction, Prediction.instance_id == Instance.id)
         .order_by(Instance.received_at.desc(), Instance.id.desc())
         .limit(max(1, min(limit, MAX_INSTANCES))).offset(max(0, offset)))
    if study_instance_uid:
        q = q.where(Study.study_instance_uid == study_instance_uid)
    if state:
        q = q.where(Instance.state == state)
    if received_from is not None:
        q = q.where(Instance.received_at >= received_from)
    if received_before is not None:
        q = q.where(Instance.received_at < received_before)
    rows = [instance_row(*row) for row in session.execute(q)]
    _blind_audited(session, rows)
    return rows


def _blind_audited(session: Session, rows: list[dict[str, Any]]) -> None:
    """No AI score for the images of a study whose audit read is still open (blinded)."""
    uids = {r["study_instance_uid"] for r in rows}
    if not uids:
        return
    blinded = set(session.scalars(
        select(Study.study_instance_uid).join(WorklistItem, WorklistItem.study_id == Study.id)
        .where(Study.study_instance_uid.in_(uids), WorklistItem.kind == audit.AUDIT,
               WorklistItem.status != WorklistStatus.COMPLETED.value, WorklistItem.open_study_id.is_not(None))))
    for r in rows:
        if r["study_instance_uid"] in blinded:
            r.update(probability=None, positive=None, threshold=None, blinded=True)


def item_detail(session: Session, item_id: int, now: datetime | None = None) -> dict[str, Any]:
    """The item's worklist fields, its study's instances with predictions, and its history."""
    rows = fetch_rows(session, row_query().where(WorklistItem.id == item_id))
    if not rows:
        raise ItemNotFound(f"item {item_id} does not exist", item_id)
    r = rows[0]
    out = item_row(r, now or utcnow())
    out.update({
        "comment": r["comment"], "cancel_reason": r["cancel_reason"], "claimed_at": _iso(r["claimed_at"]),
        "patient_sex": r["patient_sex"], "patient_birth_date": r["patient_birth_date"],
        "referring_physician": r["referring_physician"],
    })
    out["instances"] = sorted(
        list_instances(session, study_instance_uid=r["study_instance_uid"], limit=MAX_INSTANCES),
        key=lambda r: (-(r["probability"] or -1.0), r["id"]))
    out["events"] = [
        {"at": _iso(e.at), "kind": e.kind, "actor": e.actor, "detail": e.detail}
        for e in session.scalars(select(Event).where(Event.worklist_item_id == r["id"]).order_by(Event.id))
    ]
    out["history"] = study_history(session, r["id"])
    return audit.blind(out)
