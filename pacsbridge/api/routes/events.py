"""``/api/events``: the audit trail, newest first (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query

from ...store import events as audit
from ..auth import admin
from ..deps import DbSession, Now

router = APIRouter(tags=["admin"])


@router.get("/api/events", dependencies=[Depends(admin)])
def events(
    session: DbSession, now: Now,
    kind: str | None = Query(None, max_length=32, description="only this kind, e.g. association_rejected"),
    since: str | None = Query(None, max_length=40, description="ISO date/time or a duration back (24h, 7d)"),
    limit: int = Query(audit.DEFAULT_LIMIT, ge=1, le=audit.MAX_LIMIT),
) -> list[dict[str, Any]]:
    """The audit trail, newest first: at, kind, level, actor, detail (admin)."""
    try:
        after = audit.parse_since(since, now) if since else None
    except ValueError as exc:
        raise HTTPException(422, f"since: {exc}") from None
    return audit.list_events(session, kind=kind, since=after, limit=limit)
