"""Live performance at the site: per model and calibration, over a window and in total.

Every figure comes from aggregate SQL over indexed columns (one row per model and calibration
comes back, not one per prediction); only the receipt-to-read times of completed items are
fetched as rows (their percentiles are computed here, SQLite has no percentile function).

What each figure is (studies, not images, unless it says images):

- ``scored``/``flagged``: images scored, and scored positive (shadow-mode predictions included;
  ``shadow`` counts them).
- ``completed``, ``ppv``, ``ppv_ci``: flagged studies a reader completed, by finding; PPV is
  completed-as-pneumonia / completed, with a Wilson 95 % interval.
- ``sensitivity``: ``method`` says which estimator.  ``ris_labels`` (direct, no estimate): from RIS
  labels (``pacsbridge labels import``) of scored studies, flagged / labelled pneumonia, with a
  Wilson 95 % interval; used when RIS labels cover at least :data:`RIS_FULL_SHARE` of the scored
  studies, or when there is no audit read.  ``audit_estimate``: from blinded audit reads of
  negatives (pacsbridge.worklist.audit) and the reads of flags, see
  pacsbridge.validation.audit_estimate.  Reader findings of flags alone cannot reveal a miss.
  ``value`` null and ``method`` ``none`` when neither exists.
- ``audit``: audit items of studies scored negative: ``sampled`` (made), ``completed``, ``pneumonia``;
  ``studies``: studies flagged and studies scored negative (not in shadow mode): the estimator's F and N
  (counted only once audit items exist; zeros before).
- ``npv``: RIS-labelled studies scored negative that are not pneumonia / RIS-labelled negatives.
- ``receipt_to_completion_s``: receipt of the study to the reader's completion, p50/p95 over the
  latest :data:`TIMES_OF` completed items (``n`` says how many).
- ``refused`` (top level): images not analysed, by reason (the reason's first words).

A study's flag for a model and calibration: any of its images scored positive by it.  The truth
of a study from the RIS is pneumonia when any of its RIS labels says pneumonia.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from ..store.models import (
    Finding, Instance, InstanceState, Label, Prediction, Series, Study, WorklistItem, WorklistStatus, utcnow,
)
from .audit_estimate import audit_sensitivity
from .ris_labels import label_counts
from .stats import wilson_interval

#: Receipt-to-read percentiles are over at most this many most recent completed items.
TIMES_OF = 1000
#: Default window of the live figures.
DEFAULT_WINDOW = timedelta(days=30)
SENSITIVITY_METHOD = {
    "ris_labels": "direct: pneumonia-labelled studies (RIS) that were flagged / all pneumonia-labelled studies (RIS)",
    "none": "no scored study has a RIS label (pacsbridge labels import) or a completed audit read yet",
}
#: RIS labels are taken as complete (no estimate needed) when they cover this share of the scored studies.
RIS_FULL_SHARE = 0.9


def _i(x: Any) -> int:
    return int(x or 0)


def _ratio(k: int, n: int) -> float | None:
    return round(k / n, 4) if n else None


def _ci(k: int, n: int) -> list[float] | None:
    ci = wilson_interval(k, n)
    return None if ci is None else [round(ci[0], 4), round(ci[1], 4)]


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 1) if values else None


def _flag(expr: Any) -> Any:
    return func.sum(case((expr, 1), else_=0))


def _group_figures(session: Session, since: datetime | None) -> dict[tuple[str, str], dict[str, Any]]:
    """The figures of each (model, calibration), predictions since ``since`` (None: all).

    Each query is driven by the smaller side: the prediction counts scan predictions once (no
    join); the RIS confusion starts from the labels, the reader figures from the closed items, and
    both reach predictions through the indexed study -> series -> instance -> prediction keys."""
    P = Prediction
    window = [P.created_at >= since] if since is not None else []
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for mid, cal, n, flagged, shadow in session.execute(
        select(P.model_id, P.calibration, func.count(), _flag(P.positive.is_(True)), _flag(P.shadow.is_(True)))
        .where(*window).group_by(P.model_id, P.calibration)):
        out[(mid, cal)] = {**_empty(mid, cal), "scored": _i(n), "flagged": _i(flagged), "shadow": _i(shadow)}
    if not out:
        return out
    positive = func.max(case((P.positive.is_(True), 1), else_=0))

    def via_study(study_id: Any):  # noqa: ANN202 - predictions of the study ``study_id`` names
        return (Series.__table__.join(Instance.__table__, Instance.series_id == Series.id)
                .join(P.__table__, P.instance_id == Instance.id)), Series.study_id == study_id

    # RIS labels: one row per (model, calibration, labelled study): flagged? pneumonia?
    ris_truth = (select(Label.study_id.label("sid"),
                        func.max(case((Label.finding == Finding.PNEUMONIA.value, 1), else_=0)).label("pos"))
                 .where(Label.study_id.is_not(None)).group_by(Label.study_id).subquery())
    joined, on = via_study(ris_truth.c.sid)
    per = (select(P.model_id.label("mid"), P.calibration.label("cal"), ris_truth.c.pos.label("pos"),
                  positive.label("flag"))
           .select_from(ris_truth).join(joined, on).where(*window)
           .group_by(P.model_id, P.calibration, ris_truth.c.sid, ris_truth.c.pos).subquery())
    flag, pos = per.c.flag == 1, per.c.pos == 1
    for mid, cal, tp, fn, tn, fp in session.execute(
        select(per.c.mid, per.c.cal, _flag(and_(flag, pos)), _flag(and_(~flag, pos)), _flag(and_(~flag, ~pos)),
               _flag(and_(flag, ~pos))).group_by(per.c.mid, per.c.cal)):
        e = out.get((mid, cal))
        if e is None:
            continue
        tp, fn, tn, fp = _i(tp), _i(fn), _i(tn), _i(fp)
        e["npv"] = {"value": _ratio(tn, tn + fn), "ci": _ci(tn, tn + fn), "n": tn + fn}
        e["ris_labelled"] = {"true_positive": tp, "false_negative": fn, "true_negative": tn, "false_positive": fp}
    # Readers: closed items of studies this (model, calibration) flagged; one row per item, counted in SQL.
    W = WorklistItem
    joined, on = via_study(W.study_id)
    # coalesce: no index on kind for this (nearly every item is a flag), the status index drives it
    closed = and_(W.status.in_((WorklistStatus.COMPLETED.value, WorklistStatus.CANCELED.value)),
                  func.coalesce(W.kind, "flag") == "flag")
    per_item = (select(P.model_id.label("mid"), P.calibration.label("cal"), W.id.label("iid"),
                       W.status.label("status"), W.finding.label("finding"))
                .select_from(W.__table__).join(joined, on).where(closed, P.positive.is_(True), *window)
                .group_by(P.model_id, P.calibration, W.id, W.status, W.finding).subquery())
    done = per_item.c.status == WorklistStatus.COMPLETED.value
    for mid, cal, canceled, pneu, nopneu, total in session.execute(
        select(per_item.c.mid, per_item.c.cal, _flag(~done),
               _flag(and_(done, per_item.c.finding == Finding.PNEUMONIA.value)),
               _flag(and_(done, per_item.c.finding == Finding.NO_PNEUMONIA.value)), _flag(done))
        .group_by(per_item.c.mid, per_item.c.cal)):
        e = out.get((mid, cal))
        if e is not None:
            e["canceled"] = _i(canceled)
            e["completed"] = {"pneumonia": _i(pneu), "no_pneumonia": _i(nopneu),
                              "other": _i(total) - _i(pneu) - _i(nopneu)}
    # Receipt to read: the latest TIMES_OF completed items of each (bounded work, recent behaviour).
    times: dict[tuple[str, str], list[float]] = {}
    for mid, cal in out:
        rows = session.execute(
            select(Study.created_at, W.completed_at)
            .select_from(W.__table__.join(Study.__table__, Study.id == W.study_id))
            .where(W.id.in_(select(per_item.c.iid).where(per_item.c.mid == mid, per_item.c.cal == cal, done)),
                   W.completed_at.is_not(None))
            .order_by(W.completed_at.desc()).limit(TIMES_OF)).all()
        times[(mid, cal)] = [(c - r).total_seconds() for r, c in rows]
    _audit_figures(session, out, window)
    for key, e in out.items():
        done = e["completed_total"] = sum(e["completed"].values())
        e["ppv"], e["ppv_ci"] = _ratio(e["completed"]["pneumonia"], done), _ci(e["completed"]["pneumonia"], done)
        e["sensitivity"] = _sensitivity(e)
        t = times.get(key, [])
        e["receipt_to_completion_s"] = {"p50": _pct(t, 50), "p95": _pct(t, 95), "n": len(t)}
    return out


def _audit_figures(session: Session, out: dict[tuple[str, str], dict[str, Any]], window: list[Any]) -> None:
    """Studies flagged / scored negative, and the audit items of the negatives, per (model, calibration).

    The study counts group every prediction by study (the costliest query here): only made when
    audit items exist, since only the audit estimator needs them."""
    P, W = Prediction, WorklistItem
    if session.scalar(select(W.id).where(W.kind == "audit").limit(1)) is None:
        return
    preds = (P.__table__.join(Instance.__table__, Instance.id == P.instance_id)
             .join(Series.__table__, Series.id == Instance.series_id))
    per_study = (select(P.model_id.label("mid"), P.calibration.label("cal"),
                        func.max(case((P.positive.is_(True), 1), else_=0)).label("flag"),
                        func.max(case((P.shadow.is_(True), 1), else_=0)).label("shadow"))
                 .select_from(preds).where(*window).group_by(P.model_id, P.calibration, Series.study_id).subquery())
    for mid, cal, flagged, negative in session.execute(
            select(per_study.c.mid, per_study.c.cal, _flag(per_study.c.flag == 1),
                   _flag(and_(per_study.c.flag == 0, per_study.c.shadow == 0)))
            .group_by(per_study.c.mid, per_study.c.cal)):
        if (mid, cal) in out:
            out[(mid, cal)]["studies"] = {"flagged": _i(flagged), "negative": _i(negative)}
    per_item = (select(P.model_id.label("mid"), P.calibration.label("cal"), W.status.label("status"),
                       W.finding.label("finding"))
                .select_from(W.__table__.join(Series.__table__, Series.study_id == W.study_id)
                             .join(Instance.__table__, Instance.series_id == Series.id)
                             .join(P.__table__, P.instance_id == Instance.id))
                .where(W.kind == "audit", *window)
                .group_by(P.model_id, P.calibration, W.id, W.status, W.finding).subquery())
    done = per_item.c.status == WorklistStatus.COMPLETED.value
    for mid, cal, sampled, completed, pneumonia in session.execute(
            select(per_item.c.mid, per_item.c.cal, func.count(), _flag(done),
                   _flag(and_(done, per_item.c.finding == Finding.PNEUMONIA.value)))
            .group_by(per_item.c.mid, per_item.c.cal)):
        if (mid, cal) in out:
            out[(mid, cal)]["audit"].update(sampled=_i(sampled), completed=_i(completed), pneumonia=_i(pneumonia))


def _sensitivity(e: dict[str, Any]) -> dict[str, Any]:
    """The estimator for this entry: RIS labels when they are (nearly) complete, else audit reads,
    else whatever RIS labels exist (see the module docstring)."""
    ris = e["ris_labelled"]
    tp, fn = ris["true_positive"], ris["false_negative"]
    studies = e["studies"]
    scored_studies = studies["flagged"] + studies["negative"]
    ris_direct = {"value": _ratio(tp, tp + fn), "ci": _ci(tp, tp + fn), "n": tp + fn, "method": "ris_labels",
                  "estimator": SENSITIVITY_METHOD["ris_labels"]}
    if tp + fn and sum(ris.values()) >= RIS_FULL_SHARE * scored_studies:
        return ris_direct
    estimate = audit_sensitivity(studies["flagged"], e["completed_total"], e["completed"]["pneumonia"],
                                 studies["negative"], e["audit"]["completed"], e["audit"]["pneumonia"])
    if estimate is not None:
        return estimate
    if tp + fn:
        return ris_direct
    return {"value": None, "ci": None, "n": 0, "method": "none", "estimator": SENSITIVITY_METHOD["none"]}


def _refused(session: Session, since: datetime | None) -> dict[str, int]:
    """Images not analysed by reason; grouped on the reason's first 40 characters in SQL (bounded
    cardinality: the numbers in a reason come later), then on its first words."""
    head = func.substr(func.coalesce(Instance.state_reason, ""), 1, 40)
    q = select(head, func.count()).where(Instance.state == InstanceState.NOT_ANALYSED.value)
    if since is not None:
        q = q.where(Instance.received_at >= since)
    out: dict[str, int] = {}
    for reason, n in session.execute(q.group_by(head)):
        key = (reason or "").split(";", 1)[0].split(":", 1)[0].split("(", 1)[0].strip() or "unknown"  # the headline
        out[key] = out.get(key, 0) + int(n)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _empty(mid: str, cal: str) -> dict[str, Any]:
    return {"model_id": mid, "calibration": cal, "scored": 0, "flagged": 0, "shadow": 0,
            "completed": {"pneumonia": 0, "no_pneumonia": 0, "other": 0}, "canceled": 0, "completed_total": 0,
            "ppv": None, "ppv_ci": None,
            "sensitivity": {"value": None, "ci": None, "n": 0, "method": "none", "estimator": SENSITIVITY_METHOD["none"]},
            "npv": {"value": None, "ci": None, "n": 0},
            "ris_labelled": {"true_positive": 0, "false_negative": 0, "true_negative": 0, "false_positive": 0},
            "receipt_to_completion_s": {"p50": None, "p95": None, "n": 0},
            "audit": {"sampled": 0, "completed": 0, "pneumonia": 0}, "studies": {"flagged": 0, "negative": 0}}


def live_stats(session: Session, since: datetime | None = None, now: datetime | None = None) -> dict[str, Any]:
    """``{"models": [...], "refused", "labels", "window"}``: each model entry holds the figures in
    total (the keys ``/api/stats`` always had, and the new ones) and a ``window`` object with the
    same figures since ``since`` (default: the last 30 days)."""
    now = now or utcnow()
    since = since if since is not None else now - DEFAULT_WINDOW
    total = _group_figures(session, None)
    recent = _group_figures(session, since)
    models = []
    for key in sorted(total):
        e = {**_empty(*key), **total[key]}
        w = {**_empty(*key), **recent.get(key, {})}
        e["window"] = {k: v for k, v in w.items() if k not in ("model_id", "calibration")}
        models.append(e)
    return {
        "models": models,
        "window": {"since": since.isoformat(), "until": now.isoformat()},
        "refused": {"total": _refused(session, None), "window": _refused(session, since)},
        "labels": label_counts(session),
    }
