"""Reading the audit trail (the ``events`` table) for admins: ``pacsbridge events`` and
``GET /api/events``, and the event counts behind the Prometheus counters.

Events are only ever added (never changed or deleted), so counts of them are counters that are right
across restarts and with several processes writing, read from the database at scrape time.
"""

from __future__ import annotations

import re
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .models import Event
from .reasons import code_of, split_reasons

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
#: transport limits of dicom/fast_transport.py); checked in this order.
ASSOCIATION_REASONS = (
    ("too many associations from", "too_many_from_peer"),
    ("too many associations", "too_many_associations"),
    ("called ae title", "called_ae_title"),
    ("calling ae title", "calling_ae_title"),
    ("tls", "tls"),
)
_STATUS_RE = re.compile(r"^status (0x[0-9A-F]{4})")
#: Only this many leading characters of a detail are grouped on: room for every reason of a refusal
#: (each at most a few hundred characters), which are counted one by one.
_PREFIX = 1000
#: Events with an id this close to the highest seen are counted again on every scrape rather than
#: added to the running totals: a transaction that took a lower id but committed later (several
#: processes on PostgreSQL) is then not missed (as worklist.items.LOOKBACK_IDS).
LOOKBACK_IDS = 64


def _refusal_codes(detail: str | None) -> list[str]:
    """The reason codes of a refusal (``pacsbridge.store.reasons``, as ``state_reasons`` records
    them), each once: an image refused for its age and for not being a chest counts under both."""
    codes = list(dict.fromkeys(code_of(text) for text in split_reasons(detail)))
    return codes or ["other"]


#: counter name -> (event kinds, labels of the detail's start: one each, or one per reason of a refusal)
COUNTERS: dict[str, tuple[tuple[str, ...], Callable[[str | None], list[str]]]] = {
    "associations_rejected": (("association_rejected",), lambda d: [_classify(d, ASSOCIATION_REASONS)]),
    "stores_rejected": (("store_rejected", "store_failed"), lambda d: [_status(d)]),
    "refusals": (("not_analysed",), _refusal_codes),
}


def _classify(text: str | None, table: tuple[tuple[str, str], ...]) -> str:
    low = (text or "").lower()
    for needle, label in table:
        if needle in low:
            return label
    return "other"


def _status(text: str | None) -> str:
    m = _STATUS_RE.match(text or "")
    return m.group(1) if m else "unknown"


class EventCounts:
    """Counts of refusals in the audit trail, by a small fixed set of classes (never free text).

    A refused image counts once under each of its reason codes, so the ``refusals`` labels add up
    to at least the number of refused images.

    Events are only ever added, so each class's count only grows: a counter that is right across
    restarts and with several processes writing.  The first read counts every event; later reads
    add only the events recorded since (a scrape's cost follows the new events, not the history).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._upto = 0  # events with id <= _upto are in _totals
        self._totals: dict[str, dict[str, int]] = {name: {} for name in COUNTERS}

    def _count(self, session: Session, lo: int, hi: int | None) -> dict[str, dict[str, int]]:
        kind_of = {k: name for name, (kinds, _) in COUNTERS.items() for k in kinds}
        head = func.substr(Event.detail, 1, _PREFIX)
        q = (select(Event.kind, head, func.count()).where(Event.kind.in_(list(kind_of)), Event.id > lo)
             .group_by(Event.kind, head))
        if hi is not None:
            q = q.where(Event.id <= hi)
        out: dict[str, dict[str, int]] = {name: {} for name in COUNTERS}
        for kind, detail, n in session.execute(q):
            name = kind_of[kind]
            for label in COUNTERS[name][1](detail):
                out[name][label] = out[name].get(label, 0) + int(n)
        return out

    def read(self, session: Session) -> dict[str, dict[str, int]]:
        """{"associations_rejected": {reason: n}, "stores_rejected": {status: n}, "refusals": {reason: n}}."""
        with self._lock:
            top = int(session.scalar(select(func.max(Event.id))) or 0)
            settled = max(self._upto, top - LOOKBACK_IDS)
            if settled > self._upto:
                for name, counts in self._count(session, self._upto, settled).items():
                    for label, n in counts.items():
                        self._totals[name][label] = self._totals[name].get(label, 0) + n
                self._upto = settled
            out = {name: dict(counts) for name, counts in self._totals.items()}
            for name, counts in self._count(session, self._upto, None).items():
                for label, n in counts.items():
                    out[name][label] = out[name].get(label, 0) + n
            return out
