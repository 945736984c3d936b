"""When a ``processing`` claim counts as abandoned (pure rules; :mod:`pacsbridge.store.queue` acts on them)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from .models import as_utc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def stale_reason(owner: str | None, claimed_at: datetime | None, worker_id: str, stale_after: timedelta,
                 now: datetime, *, lease_until: datetime | None = None, include_own: bool = True) -> str | None:
    """Why a ``processing`` claim counts as abandoned, seen from ``worker_id``; None if it holds.

    ``include_own``: the caller is between its batches, so a claim under its own id is a leftover.
    A claim with a lease holds exactly until the lease ends.  Claims made before leases existed
    (``lease_until`` NULL, ids ``host:pid``) hold while their pid lives on this host, or for ``stale_after``.
    """
    if not owner:
        return "claim without owner"
    if owner == worker_id:
        return "left over from a batch of this worker that was not recorded" if include_own else None
    if lease_until is not None:
        ends = as_utc(lease_until)
        return f"its lease expired at {ends.isoformat(timespec='seconds')}" if now > ends else None
    host = worker_id.split(":", 1)[0]
    o_host, _, o_pid = owner.rpartition(":")
    if o_host == host and o_pid.isdigit() and int(o_pid) != os.getpid() and not _pid_alive(int(o_pid)):
        return f"worker process {o_pid} on this host is gone"
    if claimed_at is None or now - as_utc(claimed_at) > stale_after:
        return f"claim older than {stale_after.total_seconds():.0f} s"
    return None
