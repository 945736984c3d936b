"""Live performance per ISO week (UTC) and per model: the points of the Statistics page's charts.

Each week runs Monday 00:00 UTC to the next Monday; the latest is the week of ``now``.  The week of
a row is found in SQL by a CASE over the week boundaries (the same SQL on SQLite and PostgreSQL,
and a range on the indexed timestamp), so only one row per model, calibration and week comes back.
Study-level points read ``study_scores`` (the study's first scored and first flagged times).

What each point is (images unless it says studies):

- ``scored``/``flagged``/``flag_rate``: images scored in the week by the model and calibration,
  scored positive, and their share (Wilson 95 % interval ``flag_ci``).
- ``refused``/``refusal_rate``: images received in the week and not analysed, over all images
  received in the week.  A refused image reached no model, so these are the site's and are the
  same in every model's weeks (also in the top-level ``weeks``).
- ``ppv``: flagged studies a reader completed, in the week of the study's first positive image;
  ``value`` = completed as pneumonia / completed, ``n`` = completed.
- ``sensitivity``: RIS-labelled pneumonia studies (``pacsbridge labels import``), in the week of
  the study's first scored image: flagged / labelled pneumonia, ``n`` = labelled pneumonia.

A week without the data a figure needs has ``value`` (or the rate) null: a gap, not a zero.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from ..store.models import (
    Finding, Instance, InstanceState, Label, Prediction, StudyScore, WorklistItem, WorklistStatus, utcnow,
)
from .stats import wilson_interval

DEFAULT_WEEKS = 12
MAX_WEEKS = 104
WEEK = timedelta(days=7)


def week_bounds(weeks: int, now: datetime | None = None) -> list[datetime]:
    """``weeks + 1`` Mondays 00:00 UTC: the start of each week, oldest first, and the end of the last."""
    now = now or utcnow()
    monday = (now - timedelta(days=now.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
    first = monday - (weeks - 1) * WEEK
    return [first + i * WEEK for i in range(weeks + 1)]


def _bucket(col: Any, bounds: list[datetime]) -> Any:
    """The week index (0 = oldest) of ``col``; rows are already restricted to [bounds[0], bounds[-1])."""
    return case(*[(col < b, i) for i, b in enumerate(bounds[1:])], else_=None)


def _rate(k: int, n: int) -> tuple[float | None, list[float] | None]:
    ci = wilson_interval(k, n)
    return (round(k / n, 4) if n else None), (None if ci is None else [round(ci[0], 4), round(ci[1], 4)])


def _figure(k: int, n: int) -> dict[str, Any]:
    value, ci = _rate(k, n)
    return {"value": value, "ci": ci, "n": n, "k": k}


def _sum(expr: Any) -> Any:
    return func.sum(case((expr, 1), else_=0))


def _i(x: Any) -> int:
    return int(x or 0)


def _scored(session: Session, bounds: list[datetime]) -> dict[tuple[str, str, int], tuple[int, int]]:
    P = Prediction
    inner = (select(P.model_id.label("mid"), P.calibration.label("cal"), _bucket(P.created_at, bounds).label("wk"),
                    P.positive.label("pos"))
             .where(P.created_at >= bounds[0], P.created_at < bounds[-1]).subquery())
    rows = session.execute(select(inner.c.mid, inner.c.cal, inner.c.wk, func.count(), _sum(inner.c.pos.is_(True)))
                           .group_by(inner.c.mid, inner.c.cal, inner.c.wk))
    return {(m, c, int(w)): (_i(n), _i(f)) for m, c, w, n, f in rows if w is not None}


def _received(session: Session, bounds: list[datetime]) -> dict[int, tuple[int, int]]:
    inner = (select(_bucket(Instance.received_at, bounds).label("wk"), Instance.state.label("state"))
             .where(Instance.received_at >= bounds[0], Instance.received_at < bounds[-1]).subquery())
    rows = session.execute(select(inner.c.wk, func.count(), _sum(inner.c.state == InstanceState.NOT_ANALYSED.value))
                           .group_by(inner.c.wk))
    return {int(w): (_i(n), _i(r)) for w, n, r in rows if w is not None}


def _read(session: Session, bounds: list[datetime]) -> dict[tuple[str, str, int], tuple[int, int]]:
    """(completed, completed as pneumonia) per model, calibration and week of the study's first flag."""
    S, W = StudyScore, WorklistItem
    wk = _bucket(S.first_positive_at, bounds).label("wk")
    rows = session.execute(
        select(S.model_id, S.calibration, wk, func.count(), _sum(W.finding == Finding.PNEUMONIA.value))
        .select_from(W.__table__).join(S.__table__, S.study_id == W.study_id)
        .where(W.status == WorklistStatus.COMPLETED.value, W.kind != "audit",
               S.first_positive_at >= bounds[0], S.first_positive_at < bounds[-1])
        .group_by(S.model_id, S.calibration, wk))
    return {(m, c, int(w)): (_i(n), _i(k)) for m, c, w, n, k in rows if w is not None}


def _sensitivity(session: Session, bounds: list[datetime]) -> dict[tuple[str, str, int], tuple[int, int]]:
    """(labelled pneumonia, of which flagged) per model, calibration and week of the study's first image."""
    S = StudyScore
    truth = (select(Label.study_id.label("sid"))
             .where(Label.study_id.is_not(None), Label.finding == Finding.PNEUMONIA.value)
             .group_by(Label.study_id).subquery())
    wk = _bucket(S.first_scored_at, bounds).label("wk")
    rows = session.execute(
        select(S.model_id, S.calibration, wk, func.count(), _sum(S.last_positive_at.is_not(None)))
        .select_from(truth).join(S.__table__, S.study_id == truth.c.sid)
        .where(S.first_scored_at >= bounds[0], S.first_scored_at < bounds[-1])
        .group_by(S.model_id, S.calibration, wk))
    return {(m, c, int(w)): (_i(n), _i(k)) for m, c, w, n, k in rows if w is not None}


def _label(start: datetime) -> str:
    year, week, _ = start.isocalendar()
    return f"{year}-W{week:02d}"


def weekly_figures(session: Session, weeks: int = DEFAULT_WEEKS, now: datetime | None = None) -> dict[str, Any]:
    """``{"weeks": [...site refusals per week], "models": [{"model_id", "calibration", "weeks": [...]}],
    "since", "until"}``, weeks oldest first, every week present (a week without data has null rates)."""
    weeks = max(1, min(int(weeks), MAX_WEEKS))
    bounds = week_bounds(weeks, now)
    scored, received = _scored(session, bounds), _received(session, bounds)
    read, sens = _read(session, bounds), _sensitivity(session, bounds)
    site = []
    for i in range(weeks):
        n, refused = received.get(i, (0, 0))
        rate, ci = _rate(refused, n)
        site.append({"week": _label(bounds[i]), "start": bounds[i].isoformat(), "end": bounds[i + 1].isoformat(),
                     "received": n, "refused": refused, "refusal_rate": rate, "refusal_ci": ci})
    models = []
    for mid, cal in sorted({k[:2] for d in (scored, read, sens) for k in d}):
        points = []
        for i, s in enumerate(site):
            n, flagged = scored.get((mid, cal, i), (0, 0))
            flag_rate, flag_ci = _rate(flagged, n)
            done, pneumonia = read.get((mid, cal, i), (0, 0))
            positives, caught = sens.get((mid, cal, i), (0, 0))
            points.append({"week": s["week"], "start": s["start"], "scored": n, "flagged": flagged,
                           "flag_rate": flag_rate, "flag_ci": flag_ci, "refused": s["refused"],
                           "refusal_rate": s["refusal_rate"], "refusal_ci": s["refusal_ci"],
                           "ppv": _figure(pneumonia, done), "sensitivity": _figure(caught, positives)})
        models.append({"model_id": mid, "calibration": cal, "weeks": points})
    return {"since": bounds[0].isoformat(), "until": bounds[-1].isoformat(), "weeks": site, "models": models}


def week_rows(out: dict[str, Any]) -> list[str]:
    """Plain text lines of :func:`weekly_figures` (the CLI's table)."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    def fig(f: dict[str, Any]) -> str:
        if f["value"] is None:
            return "-"
        return f"{f['value']:.1%} [{f['ci'][0]:.1%}, {f['ci'][1]:.1%}] n={f['n']}"

    lines = []
    for m in out["models"]:
        lines.append(f"{m['model_id']} ({m['calibration']})")
        lines.append(f"  {'week':<9} {'scored':>7} {'flag rate':>9} {'refused':>8}  PPV; sensitivity")
        for w in m["weeks"]:
            lines.append(f"  {w['week']:<9} {w['scored']:>7} {pct(w['flag_rate']):>9} {pct(w['refusal_rate']):>8}  "
                         f"{fig(w['ppv'])}; {fig(w['sensitivity'])}")
    if not out["models"]:
        lines.append("no predictions in these weeks")
    return lines


__all__ = ["weekly_figures", "week_bounds", "week_rows", "DEFAULT_WEEKS", "MAX_WEEKS"]
