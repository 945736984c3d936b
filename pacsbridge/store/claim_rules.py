"""When a ``processing`` claim counts as abandoned (pure rules; :mod:`pacsbridge.store.queue` acts on them)."""

from __future__ import annotations

import os
from collections.abc import Collection
from datetime import datetime, timedelta
from pathlib import Path

from .models import as_utc


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs here: a zombie (dead, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux), or it ended just now: the lease decides
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def stale_reason(owner: str | None, claimed_at: datetime | None, worker_id: str, stale_after: timedelta,
                 now: datetime, *, lease_until: datetime | None = None, include_own: bool = True,
                 gone: Collection[str] = ()) -> str | None:
    """Why a ``processing`` claim counts as abandoned, seen from ``worker_id``; None if it holds.

    ``include_own``: the caller is between its batches, so a claim under its own id is a leftover.
    ``gone``: workers known dead (pacsbridge.store.workers.gone_on_this_machine): their claims are
    abandoned at once.  Any other claim with a lease holds exactly until the lease ends.  Claims made before leases existed
    (``lease_until`` NULL, ids ``host:pid``) hold while their pid lives on this host, or for ``stale_after``.
    """
    if not owner:
        return "claim without owner"
    if owner == worker_id:
        return "left over from a batch of this worker that was not recorded" if include_own else None
    if owner in gone:
        return "its worker process on this machine is gone"
    if lease_until is not None:
        ends = as_utc(lease_until)
        return f"its lease expired at {ends.isoformat(timespec='seconds')}" if now > ends else None
    host = worker_id.split(":", 1)[0]
    o_host, _, o_pid = owner.rpartition(":")
    if o_host == host and o_pid.isdigit() and int(o_pid) != os.getpid() and not pid_alive(int(o_pid)):
        return f"worker process {o_pid} on this host is gone"
    if claimed_at is None or now - as_utc(claimed_at) > stale_after:
        return f"claim older than {stale_after.total_seconds():.0f} s"
    return None
