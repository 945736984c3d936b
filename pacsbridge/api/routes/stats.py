"""``/api/stats``: per-model live statistics (monitor, radiologist, admin)."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from sqlalchemy.orm import Session

from ...store import events as audit
from ..auth import anyone
from ..deps import Config, DbSession, Now

router = APIRouter(tags=["stats"])


class StatsCache:
    """The live figures aggregate the whole history (about 0.15 s with 100,000 predictions, see
    docs/benchmarks.md): a dashboard polling every few seconds gets figures at most ``max_age_s`` old
    instead, and many open pages cost one aggregate per ``max_age_s``."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._hits: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def figures(self, session: Session, start: datetime | None, now: datetime) -> dict[str, Any]:
        from ...validation.live import live_stats

        key = start.isoformat(timespec="minutes") if start is not None else ""
        with self._lock:
            hit = self._hits.get(key)
            if hit is not None and time.monotonic() - hit[0] < self.max_age_s:
                return hit[1]
        fresh = live_stats(session, start, now)
        with self._lock:
            if len(self._hits) > 32:
                self._hits.clear()
            self._hits[key] = (time.monotonic(), fresh)
        return fresh


@router.get("/api/stats", dependencies=[Depends(anyone)])
def stats(
    request: Request, session: DbSession, now: Now, config: Config,
    since: str | None = Query(None, max_length=40, description="start of the window: ISO date/time or 90m, "
                              "24h, 7d (default: the last 30 days); the figures in total are always there"),
) -> dict[str, Any]:
    """Per model and calibration, in total and over the window: scored, flagged, completed per finding,
    PPV with its Wilson 95 % interval, sensitivity and NPV from RIS labels, receipt-to-completion p50/p95;
    refusals by reason; label counts; the mode (live or shadow)."""
    try:
        start = audit.parse_since(since, now) if since else None
    except ValueError as exc:
        raise HTTPException(422, f"since: {exc}") from None
    out = {**request.app.state.stats_cache.figures(session, start, now), "mode": config.mode}
    # drift: a pacsbridge.validation.drift.DriftMonitor (the daemon's); none in bare test apps.
    drift = request.app.state.drift
    out["drift"] = drift.status(session, now) if drift is not None else {"alarm": False, "reference": None, "signals": []}
    return out


@router.get("/api/stats/weekly", dependencies=[Depends(anyone)])
def stats_weekly(session: DbSession, now: Now, weeks: int = Query(12, ge=1, le=104)) -> dict[str, Any]:
    """Per ISO week (UTC) and model: scored, flag rate, refusal rate, PPV and sensitivity with Wilson 95 %
    intervals and n; null where a week has no data (the Statistics page's charts)."""
    from ...validation.weekly import weekly_figures

    return weekly_figures(session, weeks, now)
