"""Live performance at the site: per model and calibration, over a window and in total.

Every figure comes from aggregate SQL over indexed columns, total and window in one pass (one row
per model and calibration comes back, not one per prediction); studies are counted from
``study_scores`` (pacsbridge.store.study_scores), kept as predictions are recorded, not by grouping
every prediction by study.  Only the receipt-to-read times of the latest completed items are
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
  ``studies``: studies flagged and studies scored negative (not in shadow mode): the estimator's F and N.
- ``npv``: RIS-labelled studies scored negative that are not pneumonia / RIS-labelled negatives.
- ``receipt_to_completion_s``: receipt of the study to the reader's completion, p50/p95 over the
  latest :data:`TIMES_OF` completed items (``n`` says how many).
- ``refused`` (top level): images not analysed, by reason (the reason's first words);
  ``refused_codes``: the same images by reason code (``age``, ``body_part``, ``ood``...), an image
  refused for several reasons under each, as ``pacsbridge_refusals_total`` counts them.

A study's flag for a model and calibration: any of its images scored positive by it.  The truth
of a study from the RIS is pneumonia when any of its RIS labels says pneumonia.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from ..store.models import (
    Finding, Instance, InstanceState, Label, Prediction, Study, StudyScore, WorklistItem, WorklistStatus, utcnow,
)
from ..store.reasons import CODES, code_of, headline
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


def _any(expr: Any) -> Any:
    return func.max(case((expr, 1), else_=0))


Figures = dict[tuple[str, str], dict[str, dict[str, Any]]]  # (model, calibration) -> "total"/"window" -> figures


def _group_figures(session: Session, since: datetime) -> Figures:
    """The figures of each (model, calibration), in total and for predictions since ``since``.

    Each figure is one aggregate query that yields total and window together (conditional sums in
    one pass).  Study-level figures read study_scores (one row per study and model, kept as
    predictions are recorded): the RIS confusion starts from the labels, the reader figures from
    the items, and each reaches its study's row by primary key."""
    out: Figures = {}
    _counts(session, since, out)
    if out:
        _ris_confusion(session, since, out)
        _reads(session, since, out)
        _completion_times(session, since, out)
        for sides in out.values():
            for e in sides.values():
                done = e["completed_total"]
                e["ppv"], e["ppv_ci"] = _ratio(e["completed"]["pneumonia"], done), _ci(e["completed"]["pneumonia"], done)
                e["sensitivity"] = _sensitivity(e)
    return out


class _Scored:
    """Conditions on a study_scores row for a window starting at ``since``."""

    def __init__(self, since: datetime) -> None:
        S = StudyScore
        self.flagged = S.last_positive_at.is_not(None)
        self.negative = and_(S.last_positive_at.is_(None), S.last_shadow_at.is_(None))
        self.w_scored = S.last_scored_at >= since
        # NULL-safe: the negation of each condition must hold for a study never flagged
        self.w_flagged = and_(S.last_positive_at.is_not(None), S.last_positive_at >= since)
        # scored in the window, and neither positive nor in shadow mode there
        self.w_negative = and_(self.w_scored, or_(S.last_positive_at.is_(None), S.last_positive_at < since),
                               or_(S.last_shadow_at.is_(None), S.last_shadow_at < since))


def _counts(session: Session, since: datetime, out: Figures) -> None:
    """Images scored / flagged / in shadow mode, and studies flagged and scored negative (not in shadow
    mode: the audit estimator's F and N): in total from one pass over study_scores, in the window
    from the window's predictions alone (a range of an index, however long the history)."""
    S, c = StudyScore, _Scored(since)
    for mid, cal, n, pos, sh, flagged, negative, w_flagged, w_negative in session.execute(
            select(S.model_id, S.calibration, func.sum(S.images), func.sum(S.positive_images),
                   func.sum(S.shadow_images), _flag(c.flagged), _flag(c.negative), _flag(c.w_flagged),
                   _flag(c.w_negative)).group_by(S.model_id, S.calibration)):
        out[(mid, cal)] = {
            "total": {**_empty(mid, cal), "scored": _i(n), "flagged": _i(pos), "shadow": _i(sh),
                      "studies": {"flagged": _i(flagged), "negative": _i(negative)}},
            "window": {**_empty(mid, cal), "studies": {"flagged": _i(w_flagged), "negative": _i(w_negative)}}}
    P = Prediction
    for mid, cal, n, pos, sh in session.execute(
            select(P.model_id, P.calibration, func.count(), _flag(P.positive.is_(True)), _flag(P.shadow.is_(True)))
            .where(P.created_at >= since).group_by(P.model_id, P.calibration)):
        if (mid, cal) in out:
            out[(mid, cal)]["window"].update(scored=_i(n), flagged=_i(pos), shadow=_i(sh))


def _ris_confusion(session: Session, since: datetime, out: Figures) -> None:
    """Flagged or not against the RIS truth of each labelled study."""
    S, c = StudyScore, _Scored(since)
    truth = (select(Label.study_id.label("sid"), _any(Label.finding == Finding.PNEUMONIA.value).label("pos"))
             .where(Label.study_id.is_not(None)).group_by(Label.study_id).subquery())
    pos = truth.c.pos == 1

    def cells(flag: Any, present: Any = True) -> list[Any]:
        return [_flag(and_(present, flag, pos)), _flag(and_(present, ~flag, pos)),
                _flag(and_(present, ~flag, ~pos)), _flag(and_(present, flag, ~pos))]

    for mid, cal, *counts in session.execute(
            select(S.model_id, S.calibration, *cells(c.flagged), *cells(c.w_flagged, c.w_scored))
            .select_from(truth).join(S.__table__, S.study_id == truth.c.sid).group_by(S.model_id, S.calibration)):
        sides = out.get((mid, cal))
        if sides is None:
            continue
        for side, (tp, fn, tn, fp) in (("total", counts[:4]), ("window", counts[4:])):
            tp, fn, tn, fp = _i(tp), _i(fn), _i(tn), _i(fp)
            sides[side]["npv"] = {"value": _ratio(tn, tn + fn), "ci": _ci(tn, tn + fn), "n": tn + fn}
            sides[side]["ris_labelled"] = {"true_positive": tp, "false_negative": fn, "true_negative": tn,
                                           "false_positive": fp}


def _reads(session: Session, since: datetime, out: Figures) -> None:
    """Reader findings of the flags this (model, calibration) made, and its audit reads of negatives."""
    S, W, c = StudyScore, WorklistItem, _Scored(since)
    done = W.status == WorklistStatus.COMPLETED.value
    closed = W.status.in_((WorklistStatus.COMPLETED.value, WorklistStatus.CANCELED.value))
    flag_item, audit = func.coalesce(W.kind, "flag") == "flag", W.kind == "audit"
    pneu, nopneu = W.finding == Finding.PNEUMONIA.value, W.finding == Finding.NO_PNEUMONIA.value

    def figures(flagged: Any, scored: Any) -> list[Any]:
        read = and_(flag_item, flagged)
        return [_flag(and_(read, ~done)), _flag(and_(read, done, pneu)), _flag(and_(read, done, nopneu)),
                _flag(and_(read, done)), _flag(and_(audit, scored)), _flag(and_(audit, scored, done)),
                _flag(and_(audit, scored, done, pneu))]

    for mid, cal, *counts in session.execute(
            select(S.model_id, S.calibration, *figures(c.flagged, True), *figures(c.w_flagged, c.w_scored))
            .select_from(W.__table__).join(S.__table__, S.study_id == W.study_id)
            .where(or_(audit, closed)).group_by(S.model_id, S.calibration)):
        sides = out.get((mid, cal))
        if sides is None:
            continue
        for side, part in (("total", counts[:7]), ("window", counts[7:])):
            canceled, pn, npn, total, sampled, completed, pneumonia = (_i(x) for x in part)
            e = sides[side]
            e["canceled"] = canceled
            e["completed"] = {"pneumonia": pn, "no_pneumonia": npn, "other": total - pn - npn}
            e["completed_total"] = total
            e["audit"] = {"sampled": sampled, "completed": completed, "pneumonia": pneumonia}


def _completion_times(session: Session, since: datetime, out: Figures) -> None:
    """Receipt to read of the latest TIMES_OF completed flag items of each (model, calibration), in
    total and in the window.  Completed items are walked newest first along the (status,
    completed_at) index and the walk stops once every model has its TIMES_OF (or all of its
    completed reads, counted by _reads): with one model in use, about TIMES_OF rows are read."""
    S, W, c = StudyScore, WorklistItem, _Scored(since)
    want = {(key, side): min(TIMES_OF, e["completed_total"]) for key, sides in out.items() for side, e in sides.items()}
    times: dict[tuple[tuple[str, str], str], list[float]] = {k: [] for k in want}
    missing = sum(want.values())
    rows = session.execute(
        select(S.model_id, S.calibration, Study.created_at, W.completed_at, c.w_flagged)
        .select_from(W.__table__).join(S.__table__, S.study_id == W.study_id).join(Study.__table__, Study.id == W.study_id)
        # kind != audit, not kind == flag: the (status, completed_at) index must drive the walk
        .where(W.status == WorklistStatus.COMPLETED.value, W.completed_at.is_not(None), W.kind != "audit", c.flagged)
        .order_by(W.completed_at.desc()).execution_options(yield_per=256))
    try:
        for mid, cal, received, completed, in_window in rows:
            if missing <= 0:
                break
            for side in ("total", "window") if in_window else ("total",):
                got = times.get(((mid, cal), side))
                if got is not None and len(got) < want[((mid, cal), side)]:
                    got.append((completed - received).total_seconds())
                    missing -= 1
    finally:
        rows.close()
    for key, sides in out.items():
        for side, e in sides.items():
            t = times[(key, side)]
            e["receipt_to_completion_s"] = {"p50": _pct(t, 50), "p95": _pct(t, 95), "n": len(t)}


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


def _refused(session: Session, since: datetime) -> dict[str, dict[str, int]]:
    """Images not analysed by reason, in total and since ``since`` (one pass); grouped on the reason's
    first 40 characters in SQL (bounded cardinality: the numbers in a reason come later), then on its
    first words."""
    head = func.substr(func.coalesce(Instance.state_reason, ""), 1, 40)
    out: dict[str, dict[str, int]] = {"total": {}, "window": {}}
    for reason, n, w in session.execute(
            select(head, func.count(), _flag(Instance.received_at >= since))
            .where(Instance.state == InstanceState.NOT_ANALYSED.value).group_by(head)):
        key = headline(reason) or "unknown"
        for side, k in (("total", _i(n)), ("window", _i(w))):
            if k:
                out[side][key] = out[side].get(key, 0) + k
    return {side: dict(sorted(d.items(), key=lambda kv: -kv[1])) for side, d in out.items()}


def _refused_codes(session: Session, since: datetime) -> dict[str, dict[str, int]]:
    """Images not analysed by reason code, in total and since ``since``: an image refused for several
    reasons counts under each (as ``pacsbridge_refusals_total``).  One pass over the refused images,
    testing their recorded reason list for each code; images recorded before the list existed count
    under the code of their reason's text."""
    Inst = Instance
    recent = Inst.received_at >= since
    has = [Inst.state_reasons.like(f'%"code": "{code}"%') for code in CODES]
    row = session.execute(
        select(*(_flag(h) for h in has), *(_flag(and_(h, recent)) for h in has))
        .where(Inst.state == InstanceState.NOT_ANALYSED.value, Inst.state_reasons.is_not(None))).one()
    total = {code: _i(n) for code, n in zip(CODES, row[:len(CODES)], strict=True)}
    window = {code: _i(n) for code, n in zip(CODES, row[len(CODES):], strict=True)}
    head = func.substr(func.coalesce(Inst.state_reason, ""), 1, 80)
    for text, n, w in session.execute(
            select(head, func.count(), _flag(recent))
            .where(Inst.state == InstanceState.NOT_ANALYSED.value, Inst.state_reasons.is_(None)).group_by(head)):
        code = code_of(text or "")
        total[code] += _i(n)
        window[code] += _i(w)
    return {"total": {k: v for k, v in total.items() if v}, "window": {k: v for k, v in window.items() if v}}


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
    """``{"models": [...], "refused", "refused_codes", "labels", "window"}``: each model entry holds the figures in
    total (the keys ``/api/stats`` always had, and the new ones) and a ``window`` object with the
    same figures since ``since`` (default: the last 30 days)."""
    now = now or utcnow()
    since = since if since is not None else now - DEFAULT_WINDOW
    figures = _group_figures(session, since)
    models = []
    for key in sorted(figures):
        e = figures[key]["total"]
        e["window"] = {k: v for k, v in figures[key]["window"].items() if k not in ("model_id", "calibration")}
        models.append(e)
    return {
        "models": models,
        "window": {"since": since.isoformat(), "until": now.isoformat()},
        "refused": _refused(session, since),
        "refused_codes": _refused_codes(session, since),
        "labels": label_counts(session),
    }
