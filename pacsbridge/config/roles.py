"""The parts of ``pacsbridge serve`` a node may run, and the parsing of ``roles`` / ``serve --roles``."""

from __future__ import annotations

#: The parts of ``pacsbridge serve`` a node may run (``roles``, ``serve --roles``).
ROLES = ("receiver", "worker", "scheduler", "api")


def parse_roles(text: str) -> list[str]:
    """``"receiver,worker"`` -> ["receiver", "worker"]; ValueError naming an unknown role."""
    roles = [r.strip().lower() for r in text.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (known: {', '.join(ROLES)})")
    if not roles:
        raise ValueError(f"at least one role is needed ({', '.join(ROLES)})")
    return list(dict.fromkeys(roles))

