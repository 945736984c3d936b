"""Reading the audit trail (the ``events`` table) for admins: ``pacsbridge events`` and
``GET /api/events``, and the event counts behind the Prometheus counters.

Events are only ever added (never changed or deleted), so counts of them are counters that are right
across restarts and with several processes writing, read from the database at scrape time.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Event, Instance, InstanceState

#: Default and largest number of events one listing returns.
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

_DURATION_RE = re.compile(r"^(\d{1,6})\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``2026-12-01``, ``2026-12-01T20:00:00+00:00`` (no zone = UTC) or a duration back from now
    (``90m``, ``24h``, ``7d``); ValueError with the accepted forms otherwise."""
    text = value.strip()
    m = _DURATION_RE.match(text)
    if m:
        now = now or datetime.now(timezone.utc)
        return now - timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a time: use an ISO date/time (2026-12-01, 2026-12-01T20:00:00Z) "
                         "or a duration such as 90m, 24h, 7d") from None
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).isoformat()


def list_events(session: Session, *, kind: str | None = None, since: datetime | None = None,
                limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
    """Events newest first: ``at``, ``kind``, ``level``, ``actor``, ``detail`` (plus ``peer`` and the
    ids of the instance / worklist item it concerns).  No patient data is stored in events."""
    q = select(Event).order_by(Event.at.desc(), Event.id.desc()).limit(max(1, min(int(limit), MAX_LIMIT)))
    if kind:
        q = q.where(Event.kind == kind)
    if since is not None:
        q = q.where(Event.at >= since)
    return [{"id": e.id, "at": _iso(e.at), "kind": e.kind, "level": e.level, "actor": e.actor, "detail": e.detail,
             "peer": e.peer, "instance_id": e.instance_id, "worklist_item_id": e.worklist_item_id}
            for e in session.scalars(q)]


# -- counters --------------------------------------------------------------------------------------
#: Association refusals, by the start of the recorded reason (storage_scp.rejection_reason and the
#: transport limits of dicom/fast_transport.py).
ASSOCIATION_REASONS = (
    ("too many associations fr", "too_many_from_peer"),  # "... from <address>", cut at _PREFIX
    ("too many associations", "too_many_associations"),
    ("called ae title", "called_ae_title"),
    ("calling ae title", "calling_ae_title"),
    ("tls", "tls"),
)
#: Refusals of an image (``not_analysed``), by what the reason names; checked in this order.
REFUSAL_CLASSES = (
    ("patient age", "age"),
    ("out-of-distribution", "out_of_distribution"),
    ("body part", "not_chest"), ("not chest", "not_chest"), ("limb or breast", "not_chest"),
    ("view", "not_frontal"),
    ("modality", "not_radiograph"),
    ("colour", "colour"),
    ("too small", "too_small"), ("not a 2-d image", "not_2d"),
    ("could not be decoded", "decode"), ("could not be parsed", "decode"), ("not a dicom file", "decode"),
    ("too large", "too_large"), ("file not found", "file_missing"),
)
_STATUS_RE = re.compile(r"^status (0x[0-9A-F]{4})")
#: Only this many leading characters of a reason are grouped on (keeps the scrape's result small
#: however many different AE titles a peer tried).
_PREFIX = 24


def _classify(text: str | None, table: tuple[tuple[str, str], ...]) -> str:
    low = (text or "").lower()
    for needle, label in table:
        if needle in low:
            return label
    return "other"


def association_rejections(session: Session) -> dict[str, int]:
    """{reason class: count} of ``association_rejected`` events."""
    out: dict[str, int] = {}
    for head, n in session.execute(
            select(func.substr(Event.detail, 1, _PREFIX), func.count())
            .where(Event.kind == "association_rejected").group_by(func.substr(Event.detail, 1, _PREFIX))):
        label = _classify(head, ASSOCIATION_REASONS)
        out[label] = out.get(label, 0) + int(n)
    return out


def store_rejections(session: Session) -> dict[str, int]:
    """{DIMSE status "0xA700": count} of C-STOREs answered with a failure (``store_rejected`` and
    ``store_failed`` events)."""
    out: dict[str, int] = {}
    for head, n in session.execute(
            select(func.substr(Event.detail, 1, 13), func.count())
            .where(Event.kind.in_(("store_rejected", "store_failed"))).group_by(func.substr(Event.detail, 1, 13))):
        m = _STATUS_RE.match(head or "")
        label = m.group(1) if m else "unknown"
        out[label] = out.get(label, 0) + int(n)
    return out


def refusals(session: Session) -> dict[str, int]:
    """{reason class: count} of instances refused (``not_analysed``), from their recorded reason."""
    out: dict[str, int] = {}
    for reason, n in session.execute(
            select(func.substr(Instance.state_reason, 1, 120), func.count())
            .where(Instance.state == InstanceState.NOT_ANALYSED.value)
            .group_by(func.substr(Instance.state_reason, 1, 120))):
        label = _classify(reason, REFUSAL_CLASSES)
        out[label] = out.get(label, 0) + int(n)
    return out
