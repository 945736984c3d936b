"""The parts of ``pacsbridge serve`` a node may run, and the parsing of ``roles`` / ``serve --roles``."""

from __future__ import annotations

import enum


class NodeRole(str, enum.Enum):
    """A part of ``pacsbridge serve`` (the values are what ``roles`` and ``serve --roles`` take)."""

    RECEIVER = "receiver"      # the DICOM listeners (C-STORE, UPS)
    WORKER = "worker"          # the inference worker
    SCHEDULER = "scheduler"    # worklist, retention, monitoring and forwarding jobs (run by the leader)
    API = "api"                # the HTTP API and web page


#: The parts of ``pacsbridge serve`` a node may run (``roles``, ``serve --roles``).
ROLES = tuple(r.value for r in NodeRole)


def parse_roles(text: str) -> list[str]:
    """``"receiver,worker"`` -> ["receiver", "worker"]; ValueError naming an unknown role."""
    roles = [r.strip().lower() for r in text.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (known: {', '.join(ROLES)})")
    if not roles:
        raise ValueError(f"at least one role is needed ({', '.join(ROLES)})")
    return list(dict.fromkeys(roles))

