"""The worker registry: who scores, where, and whether it is still alive (the ``workers`` table).

Each start of an inference worker (inside ``pacsbridge serve`` or as ``pacsbridge worker``) gets a
fresh id ``<host>:<pid>:<8 hex>``: the uuid part keeps ids unique across containers that share a
hostname or reuse pids.  The same id is ``instances.claimed_by`` of the claims it holds.

A :class:`Heartbeat` thread beside the worker loop, every ``heartbeat_s``:

* renews the lease of every claim the worker holds and its ``last_heartbeat``, in one transaction;
* returns other workers' expired leases to the queue (:func:`pacsbridge.store.queue.recover_stale_claims`),
  so a worker that died or froze loses its claims within ``claim_lease_s`` while the others run.

A worker is *live* while it has not stopped cleanly and its last heartbeat is within
``3 x heartbeat_s``; *stopped* after a clean stop; *lost* otherwise (killed, frozen, host down).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from .models import Instance, InstanceState, Worker, utcnow
from .claim_rules import machine_id, pid_alive
from .queue import DEFAULT_LEASE_S, _bound_locks

log = logging.getLogger(__name__)

#: Default ``heartbeat_s``.
DEFAULT_HEARTBEAT_S = 10.0
#: A worker whose heartbeat is older than this many intervals is no longer live.
LIVE_INTERVALS = 3
#: Rows of workers stopped or lost longer ago than this are deleted when a worker registers.
KEEP_GONE = timedelta(days=7)

PROCESSING = InstanceState.PROCESSING.value


def new_worker_id() -> str:
    """``host:pid:<8 hex>``, at most 64 characters (the width of ``instances.claimed_by``)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself in the registry."""

    id: str
    kind: str  # "serve" or "worker"
    batch_size: int
    host: str = ""
    pid: int = 0
    machine: str | None = None  # with ``pid``: a worker described from elsewhere (tests)

    def row(self, now: datetime) -> Worker:
        return Worker(id=self.id, host=self.host or socket.gethostname()[:255], pid=self.pid or os.getpid(),
                      machine=self.machine if self.pid else machine_id(), kind=self.kind,
                      batch_size=self.batch_size, started_at=now, last_heartbeat=now)


def register(sessions: sessionmaker[Session], info: WorkerInfo, now: datetime | None = None) -> None:
    """Record a starting worker (and forget workers gone for over a week that hold no claim)."""
    now = now or utcnow()
    old = now - KEEP_GONE
    with sessions.begin() as session:
        holding = select(Instance.claimed_by).where(Instance.state == PROCESSING, Instance.claimed_by.is_not(None))
        session.execute(delete(Worker).where(or_(Worker.stopped_at < old, Worker.last_heartbeat < old),
                                             Worker.id.not_in(holding))
                        .execution_options(synchronize_session=False))
        session.add(info.row(now))


def gone_on_this_machine(session: Session, me: str) -> set[str]:
    """Workers on this machine (same host, boot and pid namespace) that did not stop cleanly and
    whose process no longer exists: killed or crashed, their leases need not be waited for.

    A pid in use (by it, or by a newer process that got the number) reads as alive: the lease
    decides then.  So does this process's own pid (several workers may run in one process)."""
    here = machine_id()
    if here is None:
        return set()
    gone = set()
    for wid, pid in session.execute(select(Worker.id, Worker.pid).where(
            Worker.machine == here, Worker.stopped_at.is_(None), Worker.id != me)):
        if not pid_alive(pid):
            gone.add(wid)
    return gone


def beat(sessions: sessionmaker[Session], info: WorkerInfo, lease_s: float = DEFAULT_LEASE_S,
         now: datetime | None = None) -> int:
    """Renew the worker's leases and its ``last_heartbeat`` in one transaction; returns the claims renewed."""
    now = now or utcnow()
    with sessions.begin() as session:
        _bound_locks(session, lease_s)
        renewed = session.execute(
            update(Instance).where(Instance.state == PROCESSING, Instance.claimed_by == info.id)
            .values(lease_until=now + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)).rowcount or 0
        res = session.execute(update(Worker).where(Worker.id == info.id)
                              .values(last_heartbeat=now, stopped_at=None)
                              .execution_options(synchronize_session=False))
        if res.rowcount == 0:  # the start could not register it (database down then): do it now
            session.add(info.row(now))
    return int(renewed)


def mark_stopped(sessions: sessionmaker[Session], worker_id: str, now: datetime | None = None) -> None:
    """A clean stop: the worker is no longer listed as live."""
    now = now or utcnow()
    with sessions.begin() as session:
        session.execute(update(Worker).where(Worker.id == worker_id).values(stopped_at=now, last_heartbeat=now)
                        .execution_options(synchronize_session=False))


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _iso(dt: datetime | None) -> str | None:
    dt = _utc(dt)
    return dt.isoformat(timespec="seconds") if dt is not None else None


def list_workers(session: Session, heartbeat_s: float = DEFAULT_HEARTBEAT_S, *, include_gone: bool = False,
                 now: datetime | None = None) -> list[dict[str, Any]]:
    """Workers, newest start first: live ones, or with ``include_gone`` also stopped and lost ones.

    Keys: id, host, pid, kind, batch_size, started_at, last_heartbeat, stopped_at, heartbeat_age_s,
    state (live | stopped | lost), claims (instances it holds in ``processing``).
    """
    now = _utc(now or utcnow())
    live_after = now - timedelta(seconds=LIVE_INTERVALS * heartbeat_s)
    held = dict(session.execute(select(Instance.claimed_by, func.count()).where(
        Instance.state == PROCESSING, Instance.claimed_by.is_not(None)).group_by(Instance.claimed_by)).all())
    out: list[dict[str, Any]] = []
    for w in session.scalars(select(Worker).order_by(Worker.started_at.desc(), Worker.id)):
        last = _utc(w.last_heartbeat)
        state = "stopped" if w.stopped_at is not None else ("live" if last >= live_after else "lost")
        if state != "live" and not include_gone:
            continue
        out.append({
            "id": w.id, "host": w.host, "pid": w.pid, "kind": w.kind, "batch_size": w.batch_size,
            "started_at": _iso(w.started_at), "last_heartbeat": _iso(last), "stopped_at": _iso(w.stopped_at),
            "heartbeat_age_s": round((now - last).total_seconds(), 1), "state": state,
            "claims": int(held.get(w.id, 0)),
        })
    return out


def live_count(session: Session, heartbeat_s: float = DEFAULT_HEARTBEAT_S, now: datetime | None = None) -> int:
    """How many workers are live (not stopped, heartbeat within ``3 x heartbeat_s``)."""
    now = now or utcnow()
    live_after = now - timedelta(seconds=LIVE_INTERVALS * heartbeat_s)
    return int(session.scalar(select(func.count()).select_from(Worker).where(
        Worker.stopped_at.is_(None), Worker.last_heartbeat >= live_after)) or 0)


class Heartbeat:
    """The thread that keeps a worker's claims leased and returns other workers' expired ones.

    ``recover`` is called after each beat (the worker's expired-lease recovery); a database outage
    is logged once per outage and retried at the next interval, never fatal.  While ``working()``
    says the worker loop is stuck, no beat is sent: its claims expire and are scored elsewhere, as
    if the process had died (if the loop comes back, its claim checks keep it from recording twice).
    """

    def __init__(self, sessions: sessionmaker[Session], info: WorkerInfo, *, lease_s: float = DEFAULT_LEASE_S,
                 interval_s: float = DEFAULT_HEARTBEAT_S, recover: Callable[[], int] | None = None,
                 working: Callable[[], bool] | None = None) -> None:
        self._sessions = sessions
        self.info = info
        self._lease_s = lease_s
        self._interval_s = interval_s
        self._recover = recover
        self._working = working
        self._stuck = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0
        self.last_error: str | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def beat_once(self) -> bool:
        """One beat: renew, then recover other workers' expired leases; False (nothing sent) while stuck."""
        stuck = self._working is not None and not self._working()
        if stuck != self._stuck:
            self._stuck = stuck
            (log.error if stuck else log.info)(
                "worker %s: its loop %s; heartbeat %s", self.info.id, "is stuck" if stuck else "goes round again",
                "withheld, its claims will expire" if stuck else "resumed")
        if stuck:
            return False
        beat(self._sessions, self.info, self._lease_s)
        if self._recover is not None:
            self._recover()
        self.beats += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.beat_once()
                if self.last_error is not None:
                    log.info("worker %s: heartbeat works again", self.info.id)
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - e.g. the database is unreachable: try at the next beat
                if self.last_error is None:
                    log.warning("worker %s: heartbeat failed (%s: %s); claims expire after %.0f s without one",
                                self.info.id, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                                self._lease_s)
                self.last_error = f"{type(exc).__name__}: {exc}"
