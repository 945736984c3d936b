"""This node's stable id: names its own temporary spool folder (``<spool>/tmp/<node id>/``).

The id (``<hostname>-<uuid>``) is kept in ``<data_dir>/.node-id-<hostname>`` and held with an
exclusive ``flock`` on a lock file beside it for the life of the process.  A restarted node finds
its id again and cleans the leftovers of its own crash; a second process on the same host and data
folder finds the id held and takes the next slot (``.node-id-<hostname>-1``, ...), so no process
ever cleans a folder another live process is writing into.  A free slot's previous owner is dead.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import uuid
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9.-]")
MAX_SLOTS = 64
_HELD: dict[str, int] = {}  # node id -> descriptor of its locked file


def node_id(data_dir: Path) -> str:
    """A node id of this host in ``data_dir`` that no other live process holds (created on first use);
    held until :func:`release`."""
    host = _SAFE.sub("_", socket.gethostname())[:64] or "host"
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SLOTS):
        path = Path(data_dir) / (f".node-id-{host}" + (f"-{slot}" if slot else ""))
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        value = _read_or_create(path, host)
        _HELD[value] = fd
        return value
    raise OSError(f"more than {MAX_SLOTS} pacsbridge processes on this host use this data_dir")


def release(node: str | None) -> None:
    """Let another process (or a later start) take ``node``'s slot."""
    fd = _HELD.pop(node, None) if node else None
    if fd is not None:
        os.close(fd)


def _read_or_create(path: Path, host: str) -> str:
    try:
        value = path.read_text().strip()
        if value and not _SAFE.search(value):
            return value
    except FileNotFoundError:
        pass
    value = f"{host}-{uuid.uuid4().hex[:12]}"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value
