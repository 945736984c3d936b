"""Audit reads of negatives: which studies scored negative go to a blinded read, and what a reader
may see of them.

Why: readers only ever see flagged studies, so a miss (a pneumonia scored negative) is invisible
unless some negatives are read too.  A study is a candidate once it is *scored negative*: it has
predictions (none made in shadow mode), none of them positive at the operating point, and no image
of it is still waiting, being scored or failed (a fault of the system is no verdict on the study;
refused images are out of scope and do not count).

The draw is :func:`audit_draw`: SHA-256 of the Study Instance UID read as a number in [0, 1); the
study is drawn when that is below ``audit_fraction``.  It is deterministic (the same study always
draws the same number, so resending cannot game it) and decided once: ``studies.audit_decision``
records ``sampled`` (an audit item was made) or ``capped`` (the day's ``audit_max_per_day``, UTC,
was already reached), and a decided study, or one that ever had a worklist item, is never drawn
again.  Only studies whose last prediction is recent (:data:`AUDIT_LOOKBACK`) are drawn: upgrading
a site with a long history does not turn its old negatives into audits.

An audit item goes through the same life cycle as a flag (pacsbridge.worklist.lifecycle), in a
priority band below every flag (pacsbridge.worklist.priority.audit_priority_score).  Until it is
completed it is *blinded*: :func:`blind` removes the AI score from what the API shows.  If a later
image of the study scores positive, the open audit item becomes a flag (the study is no longer
negative; pacsbridge.worklist.items).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta
from typing import Any, Iterable

from pydicom.uid import generate_uid
from sqlalchemy import case, func, select, text, update
from sqlalchemy.orm import Session

from ..store.models import Instance, InstanceState, Prediction, Series, Study, WorklistItem, WorklistStatus
from .priority import audit_priority_score

log = logging.getLogger(__name__)

FLAG, AUDIT = "flag", "audit"
KINDS = (FLAG, AUDIT)
SAMPLED, CAPPED = "sampled", "capped"
#: Only studies whose latest prediction is at most this old are drawn.
AUDIT_LOOKBACK = timedelta(days=1)
#: Instances in these states keep a study from counting as scored negative (not yet decided, or a fault).
_UNDECIDED = (InstanceState.RECEIVED.value, InstanceState.PROCESSING.value, InstanceState.FAILED.value)
#: PostgreSQL advisory lock key that serialises the draw across processes (the day's cap holds).
_LOCK_KEY = 0x70616373_61756474 & 0x7FFFFFFFFFFFFFFF


def audit_draw(study_instance_uid: str) -> float:
    """The study's audit number in [0, 1): SHA-256 of the UID, first 8 bytes, as a fraction."""
    digest = hashlib.sha256(study_instance_uid.strip().encode("ascii", "replace")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def day_start(now: datetime) -> datetime:
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def recent_study_ids(session: Session, now: datetime, min_prediction_id: int | None,
                     refused_since: datetime | None = None) -> list[int]:
    """Studies with a non-shadow prediction recorded recently (and above ``min_prediction_id``), and
    studies with an image refused since ``refused_since`` (its last image may have been the one refused)."""
    cutoff = now - AUDIT_LOOKBACK
    q = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
         .join(Prediction, Prediction.instance_id == Instance.id)
         .where(Prediction.shadow.is_(False), Prediction.created_at >= cutoff))
    if min_prediction_id is not None:
        q = q.where(Prediction.id > min_prediction_id)
    refused = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
               .where(Instance.state == InstanceState.NOT_ANALYSED.value,
                      Instance.updated_at >= max(cutoff, (refused_since or cutoff))))
    return sorted(set(session.scalars(q.distinct())) | set(session.scalars(refused.distinct())))


def _negative_studies(session: Session, ids: list[int], now: datetime) -> list[tuple[int, str, float, datetime]]:
    """(study id, Study Instance UID, highest probability, last prediction time) of the undecided
    studies among ``ids`` that are scored negative (see the module docstring)."""
    pending = (select(Series.study_id).join(Instance, Instance.series_id == Series.id)
               .where(Instance.state.in_(_UNDECIDED), Series.study_id.in_(ids)))
    listed = select(WorklistItem.study_id).where(WorklistItem.study_id.in_(ids))
    flag = func.sum(case((Prediction.positive.is_(True), 1), (Prediction.shadow.is_(True), 1), else_=0))
    rows = session.execute(
        select(Study.id, Study.study_instance_uid, func.max(Prediction.probability), func.max(Prediction.created_at))
        .join(Series, Series.study_id == Study.id).join(Instance, Instance.series_id == Series.id)
        .join(Prediction, Prediction.instance_id == Instance.id)
        .where(Study.id.in_(ids), Study.audit_decision.is_(None), Study.id.not_in(pending), Study.id.not_in(listed))
        .group_by(Study.id, Study.study_instance_uid)
        .having(flag == 0)).all()
    cutoff = now - AUDIT_LOOKBACK
    return [(sid, uid, float(p), at) for sid, uid, p, at in rows if at >= cutoff]


def choose_audits(session: Session, study_ids: Iterable[int], now: datetime, *, fraction: float,
                  max_per_day: int, max_wait_minutes: float) -> int:
    """Draw the scored-negative studies among ``study_ids``; make an audit item for each one drawn
    while the day's cap allows.  Returns how many items were made."""
    ids = sorted(set(study_ids))
    if fraction <= 0 or not ids:
        return 0
    candidates = [c for c in _negative_studies(session, ids, now) if audit_draw(c[1]) < fraction]
    if not candidates:
        return 0
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
        candidates = [c for c in _negative_studies(session, [c[0] for c in candidates], now)
                      if audit_draw(c[1]) < fraction]  # again, under the lock: another process may have drawn
    today = int(session.scalar(select(func.count(WorklistItem.id)).where(
        WorklistItem.kind == AUDIT, WorklistItem.created_at >= day_start(now))) or 0)
    made = 0
    for sid, _uid, p, at in sorted(candidates, key=lambda c: (c[3], c[0])):
        if today + made >= max_per_day:
            decision = CAPPED
        else:
            decision = SAMPLED
            waited = (now - at).total_seconds() / 60.0
            session.add(WorklistItem(
                study_id=sid, open_study_id=sid, ups_uid=generate_uid(), kind=AUDIT, probability=p,
                first_positive_at=at, status=WorklistStatus.SCHEDULED.value,
                priority=audit_priority_score(waited, max_wait_minutes), created_at=now, updated_at=now))
            made += 1
        session.execute(update(Study).where(Study.id == sid, Study.audit_decision.is_(None))
                        .values(audit_decision=decision).execution_options(synchronize_session=False))
    if len(candidates) > made:
        # Not an error (the estimator uses the reads actually made), but the share audited today is
        # below audit_fraction, and whoever set it should know why.
        log.warning("audit: the day's cap (audit_max_per_day = %d) is reached: %d of %d drawn negative "
                    "studies not audited", max_per_day, len(candidates) - made, len(candidates))
    elif made:
        log.info("audit: %d negative studies drawn, %d audit items made", len(candidates), made)
    return made


def is_blinded(item: dict[str, Any]) -> bool:
    """An audit item not yet completed: its reader must not see the AI score."""
    return item.get("kind") == AUDIT and item.get("status") != WorklistStatus.COMPLETED.value


def blind(item: dict[str, Any]) -> dict[str, Any]:
    """The item as the API shows it: for a blinded audit item, no score anywhere (item, instances,
    history) and no heatmap; ``blinded`` says which it is.  Changes and returns ``item``."""
    blinded = is_blinded(item)
    item["blinded"] = blinded
    if not blinded:
        return item
    item["probability"] = None
    item["heatmap_available"] = False
    for inst in item.get("instances") or []:
        for key in ("probability", "positive", "threshold"):
            inst[key] = None
        inst.pop("heatmap_url", None)
    for h in item.get("history") or []:
        if h.get("kind") == "scored":
            h["text"] = h["text"].split(" scored", 1)[0] + " scored (the score is shown once the audit read is completed)"
        elif h.get("kind") == "listed":
            h["text"] = "Put on the worklist for a quality audit (blinded read)"
    return item


def blinded_instance(session: Session, instance_id: int) -> bool:
    """Whether the instance belongs to a study whose audit read is open (its heatmap stays hidden)."""
    return session.scalar(
        select(func.count(WorklistItem.id))
        .join(Series, Series.study_id == WorklistItem.study_id).join(Instance, Instance.series_id == Series.id)
        .where(Instance.id == instance_id, WorklistItem.kind == AUDIT, WorklistItem.open_study_id.is_not(None))) > 0
