"""This node's stable id: names its own temporary spool folder (``<spool>/tmp/<node id>/``).

Stable per data folder and host (``<hostname>-<uuid>``, kept in ``<data_dir>/.node-id-<hostname>``),
so a restarted node cleans the leftovers of its own crash and never the files another node is
writing into a shared spool at the same moment.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9.-]")


def node_id(data_dir: Path) -> str:
    """The id recorded in ``data_dir`` for this host, created on first use."""
    host = _SAFE.sub("_", socket.gethostname())[:64] or "host"
    path = Path(data_dir) / f".node-id-{host}"
    try:
        value = path.read_text().strip()
        if value and not _SAFE.search(value):
            return value
    except FileNotFoundError:
        pass
    value = f"{host}-{uuid.uuid4().hex[:12]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value
