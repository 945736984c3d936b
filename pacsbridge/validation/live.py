"""Live performance at the site: per model and calibration, over a window and in total.

Every figure comes from aggregate SQL over indexed columns (one row per model and calibration
comes back, not one per prediction); only the receipt-to-read times of completed items are
fetched as rows (their percentiles are computed here, SQLite has no percentile function).

What each figure is (studies, not images, unless it says images):

- ``scored``/``flagged``: images scored, and scored positive (shadow-mode predictions included;
  ``shadow`` counts them).
- ``completed``, ``ppv``, ``ppv_ci``: flagged studies a reader completed, by finding; PPV is
  completed-as-pneumonia / completed, with a Wilson 95 % interval.
- ``sensitivity``: from RIS labels (``pacsbridge labels import``) of scored studies: flagged /
  labelled pneumonia, with a Wilson 95 % interval; ``method`` ``ris_labels`` ("direct: every
  labelled study counts; unbiased when the RIS labels do not depend on the flag").  Reader
  findings are not used here: readers only see flagged studies, so they cannot reveal a miss.
  ``value`` null and ``method`` ``none`` when no scored study has a RIS label.
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
from ..worklist.lifecycle import as_utc
from .ris_labels import label_counts
from .stats import wilson_interval

#: Receipt-to-read percentiles are over at most this many most recent completed items.
TIMES_OF = 1000
#: Default window of the live figures.
DEFAULT_WINDOW = timedelta(days=30)
SENSITIVITY_METHOD = {
    "ris_labels": "direct: pneumonia-labelled studies (RIS) that were flagged / all pneumonia-labelled studies (RIS)",
    "none": "no scored study has a RIS label yet (pacsbridge labels import)",
}


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


Figures = dict[tuple[str, str], dict[str, Any]]


def _group_figures(session: Session, since: datetime) -> tuple[Figures, Figures]:
    """The figures of each (model, calibration) in total and over the predictions since ``since``.

    Total and window come from the same queries (the window's sums are CASE sums next to the
    totals), so each table is read once.  Each query is driven by the smaller side: the prediction
    counts scan predictions once (no join); the RIS confusion starts from the labels, the reader
    figures from the closed items, and both reach predictions through the indexed study -> series
    -> instance -> prediction keys."""
    P = Prediction
    recent = P.created_at >= since
    total: Figures = {}
    window: Figures = {}
    for mid, cal, n, flagged, shadow, wn, wflagged, wshadow in session.execute(
        select(P.model_id, P.calibration, func.count(), _flag(P.positive.is_(True)), _flag(P.shadow.is_(True)),
               _flag(recent), _flag(and_(recent, P.positive.is_(True))), _flag(and_(recent, P.shadow.is_(True))))
        .group_by(P.model_id, P.calibration)):
        total[(mid, cal)] = {**_empty(mid, cal), "scored": _i(n), "flagged": _i(flagged), "shadow": _i(shadow)}
        if _i(wn):
            window[(mid, cal)] = {**_empty(mid, cal), "scored": _i(wn), "flagged": _i(wflagged),
                                  "shadow": _i(wshadow)}
    if total:
        _ris_figures(session, recent, total, window)
        _reader_figures(session, since, total, window)
    return total, window


def _via_study(study_id: Any) -> tuple[Any, Any]:
    """study -> series -> instance -> prediction (indexed keys), and the ON clause for ``study_id``."""
    return (Series.__table__.join(Instance.__table__, Instance.series_id == Series.id)
            .join(Prediction.__table__, Prediction.instance_id == Instance.id)), Series.study_id == study_id


def _ris_figures(session: Session, recent: Any, total: Figures, window: Figures) -> None:
    """Sensitivity, NPV and the RIS confusion counts; one row per (model, calibration, labelled study)."""
    P = Prediction
    ris_truth = (select(Label.study_id.label("sid"),
                        func.max(case((Label.finding == Finding.PNEUMONIA.value, 1), else_=0)).label("pos"))
                 .where(Label.study_id.is_not(None)).group_by(Label.study_id).subquery())
    joined, on = _via_study(ris_truth.c.sid)
    per = (select(P.model_id.label("mid"), P.calibration.label("cal"), ris_truth.c.pos.label("pos"),
                  func.max(case((P.positive.is_(True), 1), else_=0)).label("flag"),
                  func.max(case((and_(recent, P.positive.is_(True)), 1), else_=0)).label("wflag"),
                  func.max(case((recent, 1), else_=0)).label("win"))
           .select_from(ris_truth).join(joined, on)
           .group_by(P.model_id, P.calibration, ris_truth.c.sid, ris_truth.c.pos).subquery())
    pos, win = per.c.pos == 1, per.c.win == 1
    cells = []
    for flag, where in ((per.c.flag == 1, True), (per.c.wflag == 1, win)):
        cells += [_flag(and_(where, flag, pos)), _flag(and_(where, ~flag, pos)), _flag(and_(where, ~flag, ~pos)),
                  _flag(and_(where, flag, ~pos))]
    for mid, cal, *counts in session.execute(select(per.c.mid, per.c.cal, *cells).group_by(per.c.mid, per.c.cal)):
        for out, (tp, fn, tn, fp) in ((total, counts[:4]), (window, counts[4:])):
            e = out.get((mid, cal))
            if e is None:
                continue
            tp, fn, tn, fp = _i(tp), _i(fn), _i(tn), _i(fp)
            method = "ris_labels" if tp + fn else "none"
            e["sensitivity"] = {"value": _ratio(tp, tp + fn), "ci": _ci(tp, tp + fn), "n": tp + fn, "method": method,
                                "estimator": SENSITIVITY_METHOD[method]}
            e["npv"] = {"value": _ratio(tn, tn + fn), "ci": _ci(tn, tn + fn), "n": tn + fn}
            e["ris_labelled"] = {"true_positive": tp, "false_negative": fn, "true_negative": tn,
                                 "false_positive": fp}


def _reader_figures(session: Session, since: datetime, total: Figures, window: Figures) -> None:
    """Closed items of studies each (model, calibration) flagged: one row per item, counted in SQL;
    an item is in the window when one of its flagging predictions is."""
    P, W = Prediction, WorklistItem
    joined, on = _via_study(W.study_id)
    closed = W.status.in_((WorklistStatus.COMPLETED.value, WorklistStatus.CANCELED.value))
    per_item = (select(P.model_id.label("mid"), P.calibration.label("cal"), W.status.label("status"),
                       W.finding.label("finding"), func.max(P.created_at).label("last"))
                .select_from(W.__table__).join(joined, on).where(closed, P.positive.is_(True))
                .group_by(P.model_id, P.calibration, W.id, W.status, W.finding).subquery())
    done = per_item.c.status == WorklistStatus.COMPLETED.value
    cells = []
    for where in (True, per_item.c.last >= since):
        cells += [_flag(and_(where, ~done)), _flag(and_(where, done, per_item.c.finding == Finding.PNEUMONIA.value)),
                  _flag(and_(where, done, per_item.c.finding == Finding.NO_PNEUMONIA.value)), _flag(and_(where, done))]
    for mid, cal, *counts in session.execute(
            select(per_item.c.mid, per_item.c.cal, *cells).group_by(per_item.c.mid, per_item.c.cal)):
        for out, (canceled, pneu, nopneu, n_done) in ((total, counts[:4]), (window, counts[4:])):
            e = out.get((mid, cal))
            if e is not None:
                e["canceled"] = _i(canceled)
                e["completed"] = {"pneumonia": _i(pneu), "no_pneumonia": _i(nopneu),
                                  "other": _i(n_done) - _i(pneu) - _i(nopneu)}
    for out, start in ((total, None), (window, since)):
        for (mid, cal), e in out.items():
            n_done = e["completed_total"] = sum(e["completed"].values())
            e["ppv"], e["ppv_ci"] = _ratio(e["completed"]["pneumonia"], n_done), _ci(e["completed"]["pneumonia"], n_done)
            t = _read_times(session, mid, cal, start) if n_done else []
            e["receipt_to_completion_s"] = {"p50": _pct(t, 50), "p95": _pct(t, 95), "n": len(t)}


def _read_times(session: Session, mid: str, cal: str, since: datetime | None) -> list[float]:
    """Receipt to read of the latest TIMES_OF completed items this (model, calibration) flagged (bounded
    work, recent behaviour): walks the completed items newest first, each checked by an indexed EXISTS."""
    P, W = Prediction, WorklistItem
    joined, on = _via_study(W.study_id)
    flagged = (select(P.id).select_from(joined)
               .where(on, P.model_id == mid, P.calibration == cal, P.positive.is_(True),
                      *([P.created_at >= since] if since is not None else [])).exists())
    rows = session.execute(
        select(Study.created_at, W.completed_at)
        .select_from(W.__table__.join(Study.__table__, Study.id == W.study_id))
        .where(W.status == WorklistStatus.COMPLETED.value, W.completed_at.is_not(None), flagged)
        .order_by(W.completed_at.desc()).limit(TIMES_OF)).all()
    return [(as_utc(c) - as_utc(r)).total_seconds() for r, c in rows]


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
            "receipt_to_completion_s": {"p50": None, "p95": None, "n": 0}}


def live_stats(session: Session, since: datetime | None = None, now: datetime | None = None) -> dict[str, Any]:
    """``{"models": [...], "refused", "labels", "window"}``: each model entry holds the figures in
    total (the keys ``/api/stats`` always had, and the new ones) and a ``window`` object with the
    same figures since ``since`` (default: the last 30 days)."""
    now = as_utc(now or utcnow())
    since = as_utc(since) if since is not None else now - DEFAULT_WINDOW
    total, recent = _group_figures(session, since)
    models = []
    for key in sorted(total):
        e = {**_empty(*key), **total[key], "audit": {"sampled": 0, "completed": 0, "pneumonia": 0}}
        w = {**_empty(*key), **recent.get(key, {})}
        e["window"] = {k: v for k, v in w.items() if k not in ("model_id", "calibration")}
        models.append(e)
    return {
        "models": models,
        "window": {"since": since.isoformat(), "until": now.isoformat()},
        "refused": {"total": _refused(session, None), "window": _refused(session, since)},
        "labels": label_counts(session),
    }
