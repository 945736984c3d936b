"""One study's history in plain words, for the reader: received (from which AE), scored (or not
analysed, and why), put on the worklist, claimed, released, completed, canceled, forwarded (to
whom), built from the rows and events that recorded each step.  Times stay UTC ISO 8601 here;
the page shows them in the reader's local time.  No patient data: the reader already sees the
study it belongs to."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..store.models import (Event, Finding, Instance, InstanceState, OutboxEntry, OutboxState, Prediction, Series,
                             Study, WorklistItem)

_OBJECTS = {"sr": "the AI result (DICOM SR)", "heatmap": "the heatmap image", "images": "the images",
            "oru": "the AI result (HL7 ORU)"}
_FINDINGS = {Finding.PNEUMONIA.value: "pneumonia", Finding.NO_PNEUMONIA.value: "no pneumonia",
             Finding.OTHER.value: "other finding"}


def _pct(p: float) -> str:
    return f"{p * 100:.0f}%"


def _entry(at: datetime | None, kind: str, text: str, actor: str | None = None) -> dict[str, Any]:
    return {"at": at.isoformat() if at else None, "kind": kind, "text": text, "actor": actor}


def _item_event(e: Event, item: WorklistItem) -> dict[str, Any] | None:
    who, detail = e.actor or "someone", e.detail or ""
    if e.kind == "worklist_claim":
        text = f"Claim renewed by {who}" if "renewed" in detail else f"Claimed by {who}"
    elif e.kind == "worklist_release":
        held = re.search(r"claim held by ([^)]+)\)", detail)
        text = f"Released by {who}" + (f" (it was claimed by {held.group(1)})" if held else "") + ": back on the list"
    elif e.kind == "worklist_complete":
        m = re.search(r"finding (\w+)", detail)
        text = f"Completed by {who}: {_FINDINGS.get(m.group(1), m.group(1)) if m else 'read'}"
    elif e.kind == "worklist_cancel":
        text = f"Canceled by {who}" + (f": {item.cancel_reason}" if item.cancel_reason else "")
    elif e.kind == "worklist_claim_expired":
        m = re.search(r"claim by (.+?) expired", detail)
        text = f"Claim by {m.group(1) if m else 'a reader'} lapsed: back on the list"
    elif e.kind == "ups_performed_data":
        text = f"Progress recorded by {who} over DICOM UPS"
    else:
        return None
    return _entry(e.at, e.kind, text, e.actor)


def study_history(session: Session, item_id: int) -> list[dict[str, Any]]:
    """``[{"at", "kind", "text", "actor"}]`` oldest first, for the item's study."""
    item = session.get(WorklistItem, item_id)
    if item is None:
        return []
    out: list[dict[str, Any]] = []
    rows = session.execute(
        select(Instance, Prediction).join(Series, Series.id == Instance.series_id)
        .outerjoin(Prediction, Prediction.instance_id == Instance.id)
        .where(Series.study_id == item.study_id).order_by(Instance.received_at, Instance.id)).all()
    numbers = {inst.id: n for n, (inst, _) in enumerate(rows, 1)}
    for inst, pred in rows:
        label = f"Image {numbers[inst.id]}"
        out.append(_entry(inst.received_at, "received", f"{label} received from {inst.calling_ae or 'an unnamed AE'}"))
        if pred is not None:
            verdict = "flagged" if pred.positive else "not flagged"
            out.append(_entry(pred.created_at, "scored", f"{label} scored {_pct(pred.probability)} by {pred.model_id} "
                              f"(threshold {_pct(pred.threshold)}): {verdict}"))
        elif inst.state == InstanceState.NOT_ANALYSED.value:
            out.append(_entry(inst.updated_at, "not_analysed", f"{label} not analysed: {inst.state_reason or 'no reason'}"))
        elif inst.state == InstanceState.FAILED.value:
            retry = " (will be tried again)" if inst.next_attempt_at is not None else " (no retry left)"
            out.append(_entry(inst.updated_at, "failed", f"{label} could not be scored because of a fault of the "
                              f"system, not of the image: {inst.last_error or inst.state_reason or 'no reason'}{retry}"))
    study = session.get(Study, item.study_id)
    prio = f" (requested priority {study.requested_priority})" if study is not None and study.requested_priority else ""
    listed = (f"Put on the worklist for a quality audit (blinded read of a study scored {_pct(item.probability)}, "
              "not flagged)" if item.kind == "audit" else f"Put on the worklist at AI score {_pct(item.probability)}{prio}")
    out.append(_entry(item.created_at, "listed", listed))
    for e in session.scalars(select(Event).where(Event.worklist_item_id == item.id).order_by(Event.at, Event.id)):
        entry = _item_event(e, item)
        if entry is not None:
            out.append(entry)
    for entry, inst_id in session.execute(
            select(OutboxEntry, Prediction.instance_id).join(Prediction, Prediction.id == OutboxEntry.prediction_id)
            .where(Prediction.instance_id.in_(list(numbers)))):
        what = f"{_OBJECTS.get(entry.object, entry.object)} of image {numbers[inst_id]}"
        if entry.state == OutboxState.SENT.value:
            out.append(_entry(entry.sent_at, "forwarded", f"Forwarded {what} to {entry.destination}"))
        elif entry.state == OutboxState.DEAD.value:
            out.append(_entry(entry.updated_at, "forward_failed",
                              f"Could not forward {what} to {entry.destination}: {entry.last_error or 'gave up'}"))
        elif entry.attempts:
            out.append(_entry(entry.updated_at, "forward_retrying",
                              f"Forwarding {what} to {entry.destination}: retrying ({entry.attempts} tries so far)"))
    out.sort(key=lambda r: r["at"] or "")
    return out
