"""Drift alarms: does the recent input still look like what the model was validated on?

The recent window is the last ``drift_window_images`` images processed (scored or refused) or
those of the last ``drift_window_days`` days, whichever is smaller.  Three signals are compared
with the reference, the active site calibration's validation (``pacsbridge validate``) or, with
none, the model card's validation:

- ``ood_score``: the share of images whose out-of-distribution score is over the cut in force (a
  quantile shift: the cut is the reference's ``keep`` quantile, so about 1 % of validation images
  pass it); upper limit only.
- ``refusal_rate``: the share of images not analysed, for any reason (scope, quality, age, OOD);
  upper limit only.
- ``flag_rate``: the share of scored images flagged positive; lower and upper limits.

Limits are binomial control limits: reference ± ``drift_z`` standard errors of a proportion over
the window's n (``drift_z`` = 3 by default: a window of validation traffic leaves them about 3 times
in 1,000 checks per signal).  Nothing is judged below ``drift_min_images`` images.

State lives in the audit trail: a ``drift_alarm`` event (level warning) when a signal leaves its
limit, a ``drift_cleared`` event when it is back; the latest of the two per signal is the current
state, so several processes and restarts agree.  No patient data goes into either.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from ..store.models import Event, Instance, InstanceState, Prediction, utcnow

log = logging.getLogger(__name__)

SIGNALS = ("ood_score", "refusal_rate", "flag_rate")
ALARM, CLEARED = "drift_alarm", "drift_cleared"
#: Substring of the OOD refusal reasons (pacsbridge.inference.gates.ood_refusal).
OOD_MARK = "out-of-distribution score"
#: How those reasons begin.  Only an image refused for OOD alone counts (its reason is then the
#: headline): an adult also refused for its age was never OOD-counted by the validation either.
OOD_HEADS = ("image unlike this model's training data", OOD_MARK)


@dataclass(frozen=True)
class Reference:
    source: str                    # "model <id> validation" or "site calibration <id>"
    ood_rate: float | None
    refusal_rate: float | None
    flag_rate: float | None


@dataclass(frozen=True)
class DriftLimits:
    window_images: int = 200
    window_days: float = 7.0
    min_images: int = 50
    z: float = 3.0


def _rate(k: float, n: float) -> float | None:
    return k / n if n else None


def reference_from(card: dict[str, Any], calibration: dict[str, Any] | None = None,
                   calibration_id: str | None = None) -> Reference:
    """The reference rates of a model card (``validation``, ``ood.validation_refusal_rate``) or,
    when given, of a site calibration (``validated``, ``data``)."""
    if calibration is not None:
        v, d = calibration.get("validated") or {}, calibration.get("data") or {}
        npos, nneg = d.get("n_pneumonia") or 0, d.get("n_normal") or 0
        sens, spec = v.get("sensitivity"), v.get("specificity")
        flag = None
        if npos + nneg and sens is not None and spec is not None:
            flag = (sens * npos + (1 - spec) * nneg) / (npos + nneg)
        ood = v.get("ood_refusal_rate")
        return Reference(f"site calibration {calibration_id or '?'}", ood, ood, flag)
    val = card.get("validation") or {}
    n = sum(int(val.get(k) or 0) for k in ("tp", "fn", "tn", "fp"))
    flag = _rate(int(val.get("tp") or 0) + int(val.get("fp") or 0), n)
    ood = (card.get("ood") or {}).get("validation_refusal_rate")
    # On the validation split every refusal is an OOD one (it is all in scope), so the two coincide.
    return Reference(f"model {card.get('model_id', '?')} validation", ood, ood, flag)


def load_reference(settings: Any) -> Reference | None:
    """The reference for the configured model and site calibration; None when neither has one."""
    from ..model.artifact import card_path
    from .calibration import read_calibration

    try:
        card = json.loads(card_path(Path(settings.model_path)).read_text())
    except (OSError, ValueError):
        card = {}
    cal = cal_id = None
    if settings.site_calibration:
        cal, cal_id = read_calibration(Path(settings.site_calibration))
    ref = reference_from(card, cal, cal_id)
    if ref.ood_rate is None and ref.refusal_rate is None and ref.flag_rate is None:
        return None
    return ref


def window_counts(session: Session, limits: DriftLimits, now: datetime | None = None) -> dict[str, int]:
    """Counts over the recent window: images, refused, refused as OOD, scored, flagged (one query
    over at most ``window_images`` rows of the indexed instances table)."""
    now = now or utcnow()
    done = (InstanceState.PREDICTED.value, InstanceState.NOT_ANALYSED.value)
    recent = (select(Instance.id, Instance.state, Instance.state_reason)
              # coalesce (state is never NULL) keeps the planner off the state index: the newest images
              # are walked along the received_at index up to the limit, not every image ever scored sorted
              .where(func.coalesce(Instance.state, "").in_(done), Instance.received_at >= now - timedelta(days=limits.window_days))
              .order_by(Instance.received_at.desc(), Instance.id.desc()).limit(limits.window_images).subquery())
    refused = recent.c.state == InstanceState.NOT_ANALYSED.value
    row = session.execute(
        select(func.count(), func.sum(case((refused, 1), else_=0)),
               func.sum(case((and_(refused, or_(*(recent.c.state_reason.startswith(h) for h in OOD_HEADS))), 1), else_=0)),
               func.count(Prediction.id), func.sum(case((Prediction.positive.is_(True), 1), else_=0)))
        .select_from(recent).outerjoin(Prediction, Prediction.instance_id == recent.c.id)).one()
    n, ref, ood, scored, flagged = (int(x or 0) for x in row)
    return {"images": n, "refused": ref, "ood_refused": ood, "scored": scored, "flagged": flagged}


def _limits(p0: float, n: int, z: float) -> tuple[float, float]:
    se = math.sqrt(max(p0 * (1 - p0), 0.0) / n) if n else 0.0
    # At least one image of slack: with p0 near 0, a single refusal must not raise an alarm.
    margin = max(z * se, 1.0 / n if n else 0.0)
    return max(0.0, p0 - margin), min(1.0, p0 + margin)


def evaluate(counts: dict[str, int], ref: Reference, limits: DriftLimits) -> list[dict[str, Any]]:
    """Each signal: name, value, reference, limit (the one it is judged against: upper, or the
    nearer for flag_rate), alarm, n.  ``alarm`` is None when there is too little data or no reference."""
    n = counts["images"]
    out = []
    for name, k, denom, p0, two_sided in (
        ("ood_score", counts["ood_refused"], n, ref.ood_rate, False),
        ("refusal_rate", counts["refused"], n, ref.refusal_rate, False),
        ("flag_rate", counts["flagged"], counts["scored"], ref.flag_rate, True),
    ):
        value = _rate(k, denom)
        entry: dict[str, Any] = {"name": name, "value": None if value is None else round(value, 4),
                                 "reference": None if p0 is None else round(p0, 4), "limit": None,
                                 "alarm": None, "n": denom}
        if p0 is not None and value is not None and denom >= limits.min_images and n >= limits.min_images:
            lo, hi = _limits(p0, denom, limits.z)
            if two_sided and value < p0:
                entry["limit"], entry["alarm"] = round(lo, 4), value < lo
            else:
                entry["limit"], entry["alarm"] = round(hi, 4), value > hi
        out.append(entry)
    return out


def alarm_state(session: Session) -> dict[str, datetime]:
    """Signals in alarm now (from the audit trail) and when their alarm began."""
    latest = (select(Event.detail, Event.kind, Event.at).where(Event.kind.in_((ALARM, CLEARED)))
              .order_by(Event.id.desc()).limit(200))
    state: dict[str, tuple[str, datetime]] = {}
    for detail, kind, at in session.execute(latest):
        name = (detail or "").split(":", 1)[0]
        if name in SIGNALS and name not in state:
            state[name] = (kind, at)
    return {name: at for name, (kind, at) in state.items() if kind == ALARM}


class DriftMonitor:
    """Checks the window against the reference (the scheduler job) and serves the ``drift`` object."""

    def __init__(self, sessions: sessionmaker[Session], reference: Reference | None,
                 limits: DriftLimits | None = None) -> None:
        self._sessions = sessions
        self.reference = reference
        self.limits = limits or DriftLimits()

    def check(self, now: datetime | None = None) -> list[str]:
        """One check: record ``drift_alarm``/``drift_cleared`` events for signals that changed;
        returns the event kinds written (``kind:signal``)."""
        if self.reference is None:
            return []
        written = []
        with self._sessions.begin() as session:
            signals = evaluate(window_counts(session, self.limits, now), self.reference, self.limits)
            in_alarm = alarm_state(session)
            for s in signals:
                if s["alarm"] is None:
                    continue  # too little data: the state stays as it is
                name = s["name"]
                line = (f"{name}: window {s['value']} (n {s['n']}), reference {s['reference']} "
                        f"({self.reference.source}), limit {s['limit']}")
                if s["alarm"] and name not in in_alarm:
                    session.add(Event(kind=ALARM, level="warning", detail=line))
                    log.warning("drift alarm: %s", line)
                    written.append(f"{ALARM}:{name}")
                elif not s["alarm"] and name in in_alarm:
                    session.add(Event(kind=CLEARED, level="info", detail=line))
                    log.info("drift cleared: %s", line)
                    written.append(f"{CLEARED}:{name}")
        return written

    def status(self, session: Session, now: datetime | None = None) -> dict[str, Any]:
        """``{"alarm", "reference", "signals": [{name, alarm, value, reference, limit, since, n}]}``:
        values from the window now, alarm and since from the last check."""
        if self.reference is None:
            return {"alarm": False, "reference": None, "signals": []}
        signals = evaluate(window_counts(session, self.limits, now), self.reference, self.limits)
        in_alarm = alarm_state(session)
        for s in signals:
            since = in_alarm.get(s["name"])
            s["alarm"] = since is not None
            s["since"] = since.isoformat() if since else None
        return {"alarm": bool(in_alarm), "reference": self.reference.source, "signals": signals}
