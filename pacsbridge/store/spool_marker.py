"""The spool marker: proof that this node's spool is the one the cluster's database describes.

With several nodes on one database, every node must see the same spool (a shared file system):
an instance received on node A is scored on whichever node claims it.  A node with a spool of its
own would claim A's instances and find no files.  So the spool root holds ``.pacsbridge-spool`` with
the cluster id, and the database holds the same id (table ``cluster_identity``, one row).

At start (``serve``, ``pacsbridge worker``) :func:`check_spool_marker`:

* database and spool both without an id (a fresh installation, or the first start after the
  upgrade that brought the marker: a single node, whose spool is by definition the cluster's):
  a new id is recorded in both;
* the database without an id but a marker present (a database recreated beside a kept spool): the
  marker's id is recorded in the database;
* the database with an id: the marker must be present and carry it, else :class:`SpoolNotTheClusters`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import ClusterIdentity, utcnow

log = logging.getLogger(__name__)

MARKER_NAME = ".pacsbridge-spool"


class SpoolNotTheClusters(Exception):
    """The spool's marker is missing or names another cluster than the database (the message says which)."""


def read_marker(spool_root: Path) -> str | None:
    """The cluster id in the spool's marker, None when there is no marker; a garbled one raises."""
    path = Path(spool_root) / MARKER_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        cluster_id = str(uuid.UUID(str(json.loads(text)["cluster_id"])))
    except (ValueError, KeyError, TypeError):
        raise SpoolNotTheClusters(f"the spool marker {path} is not readable (not pacsbridge's JSON with a "
                                  "cluster_id); restore it from the cluster's spool") from None
    return cluster_id


def write_marker(spool_root: Path, cluster_id: str, fsync: bool = True) -> str:
    """Write the marker unless one appeared meanwhile (another node on the same spool); returns the id it holds.

    Written to a temporary name and hard-linked into place: the link fails if the marker exists, so
    two nodes starting at once never overwrite each other, and no reader sees a half-written file.
    """
    root = Path(spool_root)
    tmp = root / f"{MARKER_NAME}.{uuid.uuid4().hex[:8]}.tmp"
    body = json.dumps({"cluster_id": cluster_id, "created_at": utcnow().isoformat(timespec="seconds"),
                       "note": "pacsbridge spool; every node of the cluster must mount this same folder"})
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(body + "\n")
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    try:
        os.link(tmp, root / MARKER_NAME)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return read_marker(root) or cluster_id


def database_cluster_id(session: Session) -> str | None:
    return session.scalar(select(ClusterIdentity.cluster_id).where(ClusterIdentity.id == 1))


def _record_cluster_id(sessions: sessionmaker[Session], candidate: str) -> str:
    """Insert the one row (if no other node did first); returns the id the database holds."""
    try:
        with sessions.begin() as session:
            session.add(ClusterIdentity(id=1, cluster_id=candidate, created_at=utcnow()))
    except IntegrityError:
        pass  # another node recorded its id first: that one counts
    with sessions() as session:
        recorded = database_cluster_id(session)
    assert recorded is not None
    return recorded


def check_spool_marker(sessions: sessionmaker[Session], spool_root: Path, fsync: bool = True) -> str:
    """Make sure the spool at ``spool_root`` is the cluster's; returns the cluster id.

    Raises :class:`SpoolNotTheClusters` (one line saying what differs) when it is not; OSError when
    the marker cannot be written.
    """
    root = Path(spool_root)
    with sessions() as session:
        recorded = database_cluster_id(session)
    marker = read_marker(root)
    if recorded is None:
        candidate = marker or str(uuid.uuid4())
        recorded = _record_cluster_id(sessions, candidate)
        if marker is None and recorded == candidate:
            marker = write_marker(root, recorded, fsync)
            log.info("cluster id %s recorded in the database and in the spool marker", recorded)
        elif marker is None:
            # Another node recorded its id first; if it shares this spool its marker is there by now.
            marker = read_marker(root)
    if marker is None:
        raise SpoolNotTheClusters(
            f"this node's spool is not the cluster's: {root.resolve()} has no {MARKER_NAME}, but the database "
            f"belongs to cluster {recorded}; mount the cluster's shared spool there (data_dir/spool) and start again")
    if marker != recorded:
        raise SpoolNotTheClusters(
            f"this node's spool is not the cluster's: {root.resolve()}/{MARKER_NAME} names cluster {marker}, "
            f"the database cluster {recorded}; mount the spool that belongs to this database and start again")
    return recorded
