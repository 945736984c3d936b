"""When a claim counts as abandoned (pure rules; :mod:`pacsbridge.store.queue` and the outbox act on
them): lease expiry, and whether the process that holds it is gone from this machine."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import uuid
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


@functools.cache  # fixed for the life of the process; asked at every heartbeat and outbox claim
def machine_id() -> str | None:
    """Host, boot and pid namespace, hashed: two processes with the same value see the same pids, so
    one can tell that the other is gone.  None where that cannot be told (not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{socket.gethostname()}|{boot}|{pid_ns}".encode()).hexdigest()[:32]


def process_name() -> str:
    """``host:pid:<8 hex>:<machine tag>``: a process's name on leases that are not worker claims
    (outbox entries, the scheduler lock); the tag lets another process on this machine see that the
    holder is gone (:func:`gone_process`)."""
    tag = (machine_id() or "-")[:8]
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:{tag}"


def gone_process(name: str | None, me: str) -> bool:
    """Whether ``name`` (a :func:`process_name`) is a process on this machine that no longer exists.
    A pid in use (by it, or by a newer process that got the number) counts as alive: the lease decides."""
    if not name or name == me:
        return False
    parts = name.rsplit(":", 3)
    here = machine_id()
    if len(parts) != 4 or here is None or parts[3] != here[:8] or not parts[1].isdigit():
        return False
    return not pid_alive(int(parts[1]))


def stale_reason(owner: str | None, claimed_at: datetime | None, worker_id: str, stale_after: timedelta,
                 now: datetime, *, lease_until: datetime | None = None, include_own: bool = True,
                 gone: Collection[str] = ()) -> str | None:
    """Why a ``processing`` claim counts as abandoned, seen from ``worker_id``; None if it holds.

    ``include_own``: the caller is between its batches, so a claim under its own id is a leftover.
    ``gone``: workers known dead (pacsbridge.store.workers.gone_on_this_machine): their claims are
    abandoned at once.  Any other claim with a lease holds exactly until the lease ends.  Claims made
    before leases existed (``lease_until`` NULL, ids ``host:pid``) hold while their pid lives on this
    host, or for ``stale_after``.
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
