"""Site validation from what the daemon recorded (``pacsbridge validate --from-db``): the same units
as ``validate`` on files, built from recorded predictions and labels, so that a shadow period becomes
a site calibration without sending the images again.

A unit is a study (key ``study_instance_uid``) with a label:

* RIS labels (``pacsbridge labels import``) matched to the study: pneumonia when any of them says
  pneumonia, otherwise normal (``no_pneumonia`` and ``other`` are both "not pneumonia");
* else the finding of the study's latest completed worklist item (reader, flag or audit read).

Its images are the study's instances: scored ones with their recorded probability and OOD score,
refused ones (``not_analysed``) with their reason (an image the daemon refused as out of
distribution keeps the OOD score its reason names, two decimals).  Images still waiting, being
scored or failed (a fault of the system), and images scored by other weights than the loaded
model's, are left out; a labelled study left with no image is an unusable row, with its reason.

One difference from files: an image the daemon refused at the OOD cut then in force has no
probability, so a proposed cut looser than that one cannot bring it back into scope (it stays
refused, which only makes the proposed operating point more cautious).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select, union
from sqlalchemy.orm import Session

from ..model.artifact import LoadedModel
from ..store.models import (
    Finding, Instance, InstanceState, Label, Prediction, Series, Study, WorklistItem, WorklistStatus,
)
from .run import ImageRecord, Unit

_OOD_IN_REASON = re.compile(r"out-of-distribution score (-?[0-9.]+(?:e-?[0-9]+)?)")
_SKIPPED = (InstanceState.RECEIVED.value, InstanceState.PROCESSING.value, InstanceState.FAILED.value)


def _truth(session: Session) -> tuple[dict[int, int], dict[int, str]]:
    """Label (1 pneumonia, 0 not) per study id, and where it came from (``ris`` or ``reader``)."""
    labels: dict[int, int] = {}
    source: dict[int, str] = {}
    for sid, pos in session.execute(
            select(Label.study_id, func.max(case((Label.finding == Finding.PNEUMONIA.value, 1), else_=0)))
            .where(Label.study_id.is_not(None)).group_by(Label.study_id)):
        labels[sid], source[sid] = int(pos or 0), "ris"
    done = session.execute(
        select(WorklistItem.study_id, WorklistItem.finding)
        .where(WorklistItem.status == WorklistStatus.COMPLETED.value, WorklistItem.finding.is_not(None))
        .order_by(WorklistItem.completed_at, WorklistItem.id))
    for sid, finding in done:  # the latest completion wins (ordered oldest first)
        if source.get(sid) != "ris":
            labels[sid], source[sid] = int(finding == Finding.PNEUMONIA.value), "reader"
    return labels, source


def _ood_from_reason(reason: str | None) -> float | None:
    m = _OOD_IN_REASON.search(reason or "")
    return float(m.group(1)) if m else None


def units_from_db(session: Session, model: LoadedModel, since: datetime | None = None
                  ) -> tuple[list[Unit], dict[str, Any]]:
    """Units and their accounting (the keys :func:`pacsbridge.validation.run.join` gives, and a few
    more) from the database; ``since``: only instances received at or after it."""
    labels, source = _truth(session)
    labelled = union(select(Label.study_id).where(Label.study_id.is_not(None)),
                     select(WorklistItem.study_id).where(WorklistItem.status == WorklistStatus.COMPLETED.value))
    window = [Instance.received_at >= since] if since is not None else []
    rows = session.execute(
        select(Study.id, Study.study_instance_uid, Instance.sop_instance_uid, Instance.file_path, Instance.state,
               Instance.state_reason, Prediction.probability, Prediction.ood_score, Prediction.weights_sha256)
        .join(Series, Series.study_id == Study.id).join(Instance, Instance.series_id == Series.id)
        .outerjoin(Prediction, Prediction.instance_id == Instance.id)
        .where(Study.id.in_(select(labelled.subquery().c[0])), *window)
        .order_by(Study.id, Instance.received_at, Instance.id)).all()
    images: dict[int, list[ImageRecord]] = {}
    uids: dict[int, str] = {}
    why_not: dict[int, str] = {}
    for sid, uid, sop, path, state, reason, p, ood, weights in rows:
        uids[sid] = uid
        images.setdefault(sid, [])
        if state in _SKIPPED:
            why_not[sid] = f"an image is {state} (not scored yet, or a fault of the system)"
        elif p is not None and weights != model.weights_sha256:
            why_not[sid] = f"scored by other weights ({weights[:12]}...) than the loaded model's"
        elif p is not None:
            images[sid].append(ImageRecord(Path(path), sop, float(p), ood, None, uid))
        elif state == InstanceState.NOT_ANALYSED.value:
            images[sid].append(ImageRecord(Path(path), sop, None, _ood_from_reason(reason), reason or "not analysed",
                                           uid))
    units, bad = [], []
    sources = {"ris": 0, "reader": 0}
    for n, sid in enumerate(sorted(images), 1):
        if not images[sid]:
            bad.append({"line": n, "key": uids[sid], "reason": why_not.get(sid, "no image recorded")})
            continue
        units.append(Unit(uids[sid], labels[sid], images[sid]))
        sources[source[sid]] += 1
    unlabelled = select(Instance.sop_instance_uid).join(Series, Series.id == Instance.series_id).where(
        Series.study_id.not_in(select(labelled.subquery().c[0])), *window)
    without = int(session.scalar(select(func.count()).select_from(unlabelled.subquery())) or 0)
    accounting = {
        "key_column": "study_instance_uid", "rows": len(images), "rows_used": len(units), "rows_unusable": len(bad),
        "unusable": bad, "files_found": sum(len(v) for v in images.values()) + without,
        "files_without_label": without,
        "files_without_label_examples": list(session.scalars(unlabelled.limit(50))),
        "from_db": True,
        "label_sources": sources,
        "ris_labels_without_study": int(session.scalar(
            select(func.count()).select_from(Label).where(Label.study_id.is_(None))) or 0),
    }
    return units, accounting

