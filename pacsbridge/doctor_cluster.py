"""``pacsbridge doctor``'s cluster checks: is this node part of the cluster its database describes?

* ``spool marker``: the spool's ``.pacsbridge-spool`` names the cluster id the database holds (a node
  with a spool of its own would claim other nodes' images and find no files); fails with what differs.
* ``scheduler leader``: some node holds the scheduler lock (PostgreSQL: the recorded leader's session
  still holds the advisory lock; a warning when none does, since then no job that must run once runs).
* ``workers``: how many inference workers are live across the cluster; a warning on none when this
  node's configuration runs one (``worker_enabled`` and the ``worker`` role).

Like the rest of doctor they read only: the marker is never written and no id recorded.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from pacsbridge.config import Settings
from pacsbridge.health import Check, _why
from pacsbridge.store.spool_marker import MARKER_NAME, SpoolNotTheClusters, database_cluster_id, read_marker

NAMES = ("spool marker", "scheduler leader", "workers")


def cluster_checks(settings: Settings, database_ok: bool) -> list[Check]:
    """The three checks; skipped (warnings) while the database or its schema is not usable."""
    if not database_ok:
        return [Check(n, True, "not checked: the database or its schema is not usable (see above)", warn=True)
                for n in NAMES]
    from pacsbridge.store.db import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            return [_guard("spool marker", check_spool_marker, session, settings),
                    _guard("scheduler leader", check_leader, session, settings),
                    _guard("workers", check_workers, session, settings)]
    finally:
        engine.dispose()


def _guard(name: str, check, session: Session, settings: Settings) -> Check:  # noqa: ANN001
    try:
        return check(session, settings)
    except Exception as exc:  # noqa: BLE001 - one failed check, never a traceback
        session.rollback()
        return Check(name, False, f"cannot read it from the database: {_why(exc)}")


def check_spool_marker(session: Session, settings: Settings) -> Check:
    name = "spool marker"
    spool = Path(settings.spool_dir)
    recorded = database_cluster_id(session)
    if not spool.is_dir():
        return Check(name, True, f"{spool} is not a folder yet: nothing to compare", warn=True)
    try:
        marker = read_marker(spool)
    except SpoolNotTheClusters as exc:
        return Check(name, False, str(exc))
    except OSError as exc:
        return Check(name, False, f"{spool / MARKER_NAME}: cannot read it: {exc.strerror or exc}")
    if recorded is None:
        if marker is None:
            return Check(name, True, "no cluster id yet: the first start of serve or worker records one", warn=True)
        return Check(name, True, f"the database has no cluster id; the next start adopts the spool's ({marker})",
                     warn=True)
    if marker is None:
        return Check(name, False, f"{spool.resolve()} has no {MARKER_NAME}, but the database belongs to cluster "
                     f"{recorded}: this node's spool is not the cluster's (mount the shared spool there)")
    if marker != recorded:
        return Check(name, False, f"{spool.resolve()}/{MARKER_NAME} names cluster {marker}, the database cluster "
                     f"{recorded}: this node's spool belongs to another cluster (mount this database's spool)")
    return Check(name, True, f"the spool belongs to this database's cluster ({recorded})")


def check_leader(session: Session, settings: Settings) -> Check:
    from pacsbridge.store.leader import leader_info

    name = "scheduler leader"
    info = leader_info(session)
    postgres = session.bind.dialect.name == "postgresql"
    if info["held"]:
        return Check(name, True, f"{info['leader']} leads since {info['since']}"
                     + (" and holds the scheduler lock" if postgres else ""))
    if not postgres:
        return Check(name, True, "SQLite: the running serve is the leader (none is running now)")
    last = f" (the last leader, {info['leader']}, no longer holds it)" if info["leader"] else ""
    return Check(name, True, f"no node holds the scheduler lock{last}: worklist refresh, claim expiry, "
                 "retention and forwarding do not run until a serve with the scheduler role starts", warn=True)


def check_workers(session: Session, settings: Settings) -> Check:
    from pacsbridge.store.workers import list_workers

    live = list_workers(session, settings.heartbeat_s)
    if live:
        hosts = sorted({w["host"] for w in live})
        return Check("workers", True, f"{len(live)} live worker(s) on {', '.join(hosts)}")
    runs_one = settings.worker_enabled and "worker" in settings.roles
    if runs_one:
        return Check("workers", True, "no live worker: nothing is scored (start serve with the worker role or "
                     "`pacsbridge worker`)", warn=True)
    return Check("workers", True, "no live worker (this node runs none: worker_enabled = false or no worker role)")
