"""The scheduler leader: one node at a time runs the jobs that must run once.

On PostgreSQL the leader is the node whose dedicated connection holds a session-level advisory lock
(``pg_try_advisory_lock``) on a fixed 64-bit key derived from ``"pacsbridge-scheduler"`` (and the
schema, so installations sharing one database in different schemas do not exclude each other).
When the leader's process dies its session ends and PostgreSQL releases the lock; the other
candidates try again every ``retry_s`` seconds, so a new leader is elected within about ``retry_s``
of the server noticing (at once for a killed process; for a dead host, after the server's TCP
keepalive, ``tcp_keepalives_idle``).  Before each job the leader checks that its lock connection
still answers (:meth:`Leadership.is_leader`): a leader cut off from the database stops at once.

SQLite is one process: that process always leads.  The ``scheduler_leader`` row (node name, since
when, backend pid) lets ``pacsbridge status`` and ``/readyz`` name the leader from any node.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, delete, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from .claim_rules import process_name
from .models import SchedulerLeader, utcnow
from .records import record_event

log = logging.getLogger(__name__)

LOCK_NAME = "pacsbridge-scheduler"


def lock_key(name: str, schema: str | None = None) -> int:
    """A signed 64-bit advisory lock key for ``name`` (per schema unless it is ``public``)."""
    if schema and schema != "public":
        name = f"{name}:{schema}"
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def new_node_name() -> str:
    """``hostname:pid:uuid:machine`` of this process (unique across containers that reuse pids; the
    machine tag lets a restarted process here see that this one is gone, see claim_rules)."""
    return process_name()


def current_schema(conn: Connection) -> str | None:
    return conn.execute(text("SELECT current_schema()")).scalar() if conn.dialect.name == "postgresql" else None


def _lock_engine(engine: Engine) -> Engine:
    """A pool-less engine for the lock's own connection, with TCP keepalives so a cut network fails
    the leader's checks in seconds instead of the kernel's default hours."""
    args: dict[str, Any] = {"connect_timeout": 10}
    if engine.dialect.driver == "psycopg2":
        args.update(keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
                    tcp_user_timeout=15000)
    return create_engine(engine.url, poolclass=NullPool, connect_args=args)


class Leadership:
    """Holds (or waits for) the scheduler lock; a daemon component (``start``/``stop``/``healthy``)."""

    name = "scheduler leader"

    def __init__(self, engine: Engine, sessions: sessionmaker[Session], *, node: str | None = None,
                 retry_s: float = 5.0, on_acquired: Callable[[], None] | None = None) -> None:
        self.node = node or new_node_name()
        self.retry_s = retry_s
        self._engine = engine
        self._sessions = sessions
        self._on_acquired = on_acquired
        self._postgres = engine.dialect.name == "postgresql"
        self._lock_db = _lock_engine(engine) if self._postgres else None
        self._conn: Connection | None = None
        self._key: int | None = None
        self._leader = False
        self.since: datetime | None = None
        self._mutex = threading.Lock()  # the lock connection is used by the job threads and the retry loop
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # the state --------------------------------------------------------------------------------
    def is_leader(self) -> bool:
        """True while this node leads; on PostgreSQL it first checks that the lock connection still
        answers (call it before each job: a leader that lost its session stops at once)."""
        if not self._leader:
            return False
        if not self._postgres:
            return True
        with self._mutex:
            try:
                assert self._conn is not None
                self._conn.execute(text("SELECT 1"))
                return True
            except Exception as exc:  # noqa: BLE001 - the session is gone, and the lock with it
                self._lose_locked(f"lock connection lost: {type(exc).__name__}")
                return False

    def try_acquire(self) -> bool:
        """One attempt at the lock; True when this node leads (now or already)."""
        if self._leader:
            return self.is_leader()
        if not self._postgres:
            self._became_leader(None)
            return True
        with self._mutex:
            try:
                if self._conn is None:
                    self._conn = self._lock_db.connect().execution_options(isolation_level="AUTOCOMMIT")
                    self._key = lock_key(LOCK_NAME, current_schema(self._conn))
                got = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self._key}).scalar())
                pid = int(self._conn.execute(text("SELECT pg_backend_pid()")).scalar()) if got else None
            except Exception as exc:  # noqa: BLE001 - database down: try again at the next round
                log.debug("scheduler lock attempt failed: %s", exc)
                self._close_locked()
                return False
        if got:
            self._became_leader(pid)
        return got

    def _became_leader(self, backend_pid: int | None) -> None:
        since = utcnow()
        try:  # the row first: whoever sees this node lead can read it
            with self._sessions.begin() as session:
                session.execute(delete(SchedulerLeader))
                session.add(SchedulerLeader(id=1, node=self.node, since=since, backend_pid=backend_pid))
        except Exception as exc:  # noqa: BLE001 - the lock is what counts; the row is for display
            log.warning("scheduler leader: cannot record this node as leader: %s", type(exc).__name__)
        self._leader, self.since = True, since
        log.info("scheduler leader: this node (%s) leads from now on", self.node)
        record_event(self._sessions, "leader_acquired", f"{self.node} leads the scheduler")
        if self._on_acquired is not None:
            try:
                self._on_acquired()
            except Exception:  # noqa: BLE001
                log.exception("scheduler leader: start-of-leadership hook failed")

    def _lose_locked(self, why: str) -> None:
        was = self._leader
        self._leader, self.since = False, None
        self._close_locked()
        if was:
            log.warning("scheduler leader: this node (%s) no longer leads (%s); its jobs stop", self.node, why)
            record_event(self._sessions, "leader_lost", f"{self.node}: {why}", level="warning")

    def _close_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

    # component --------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        if not self.try_acquire():
            log.info("scheduler leader: another node leads; this node (%s) stands by (retry every %g s)",
                     self.node, self.retry_s)
        self._thread = threading.Thread(target=self._loop, name="scheduler-leader", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.retry_s):
            try:
                self.try_acquire()  # a leader's try_acquire is its liveness check
            except Exception:  # noqa: BLE001 - never let the loop die
                log.exception("scheduler leader loop")

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop trying; a leader gives the lock up (and clears the row) so another node takes over now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._leader:
            try:
                with self._sessions.begin() as session:
                    session.execute(delete(SchedulerLeader).where(SchedulerLeader.node == self.node))
            except Exception:  # noqa: BLE001 - the database may be gone; the lock goes with the session
                pass
        with self._mutex:
            if self._leader and self._conn is not None:
                try:
                    self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self._key})
                except Exception:  # noqa: BLE001
                    pass
            self._leader, self.since = False, None
            self._close_locked()
        if self._lock_db is not None:
            self._lock_db.dispose()


def leader_info(session: Session) -> dict[str, Any]:
    """``{"leader": node or None, "since": ISO time or None, "held": bool}`` for status and readiness;
    ``held``: on PostgreSQL the recorded session still holds the lock (a crashed leader's row stays
    until the next leader replaces it); on SQLite a recorded leader."""
    row = session.scalars(select(SchedulerLeader).limit(1)).first()
    if row is None:
        return {"leader": None, "since": None, "held": False}
    since = row.since if row.since.tzinfo else row.since.replace(tzinfo=utcnow().tzinfo)
    held = True
    if session.bind.dialect.name == "postgresql":
        key = lock_key(LOCK_NAME, session.execute(text("SELECT current_schema()")).scalar()) & (2**64 - 1)
        held = session.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = :pid "
            "AND classid::bigint = :hi AND objid::bigint = :lo AND objsubid = 1"),
            {"pid": row.backend_pid or 0, "hi": key >> 32, "lo": key & 0xFFFFFFFF}).scalar() > 0
    return {"leader": row.node, "since": since.isoformat(), "held": bool(held)}


def readiness_check(sessions: sessionmaker[Session], leadership: Leadership | None):  # noqa: ANN201 - health.Check
    """``/readyz`` ``scheduler_leader_known``: some node holds the scheduler lock (this one, or the one named)."""
    from pacsbridge.health import Check

    name = "scheduler_leader_known"
    if leadership is not None and leadership.is_leader():
        return Check(name, True, f"this node leads ({leadership.node})")
    try:
        with sessions() as session:
            info = leader_info(session)
    except Exception as exc:  # noqa: BLE001 - the database check says why
        return Check(name, False, f"cannot read the leader: {type(exc).__name__}")
    if not info["held"]:
        return Check(name, False, "no node holds the scheduler lock"
                     + (f" (last leader {info['leader']})" if info["leader"] else ""))
    return Check(name, True, f"{info['leader']} leads since {info['since']}")
