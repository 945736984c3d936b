"""The scheduler (APScheduler 3 BackgroundScheduler): worklist refresh and spool retention jobs."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.orm import Session, sessionmaker

from .items import WorklistUpdater
from .lifecycle import expire_claims
from .retention import purge_spool

log = logging.getLogger(__name__)

#: Retention does not need to run often; hourly keeps the spool within an hour of the limit.
RETENTION_INTERVAL_S = 3600.0


def _safe(name: str, fn, gate: Callable[[], bool] | None = None):  # noqa: ANN001, ANN202 - small wrapper
    """A failing job is logged and retried at its next run, never kills the scheduler.  With ``gate``
    (the scheduler leader's check) the job only runs while it says yes: on the leading node."""

    def run() -> None:
        try:
            if gate is not None and not gate():
                return
            fn()
        except Exception:  # noqa: BLE001
            log.exception("scheduler job %s failed; will retry at its next run", name)

    return run


def worklist_job(updater: WorklistUpdater, sessions: sessionmaker[Session], now: datetime | None = None) -> int:
    """One tick: return expired claims to the queue, then put new positives on it and age it.
    Returns how many claims expired."""
    now = now or datetime.now(timezone.utc)
    with sessions.begin() as session:
        expired = expire_claims(session, now)
    updater.refresh(now=now)
    return expired


def make_scheduler(
    updater: WorklistUpdater, sessions: sessionmaker[Session], spool_dir: Path, *,
    interval_s: float, retention_days: float, retention_interval_s: float = RETENTION_INTERVAL_S,
    extra_jobs: list[tuple[str, Callable[[], object], float]] | None = None,
    gate: Callable[[], bool] | None = None,
) -> BackgroundScheduler:
    """A (not yet started) scheduler with the worklist and retention jobs, and ``extra_jobs``
    ``(name, function, interval_s)`` (e.g. live monitoring); ``start()``/``shutdown()`` it.
    ``gate``: each job checks it before running (see :func:`_safe`)."""
    scheduler = BackgroundScheduler(
        timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )
    scheduler.add_job(
        _safe("worklist", lambda: worklist_job(updater, sessions), gate), "interval", seconds=interval_s, id="worklist", name="worklist refresh",
        next_run_time=datetime.now(timezone.utc),  # catch up at start, then every interval
    )
    if retention_days > 0:
        scheduler.add_job(
            _safe("retention", lambda: purge_spool(sessions, spool_dir, retention_days), gate),
            "interval", seconds=retention_interval_s, id="retention", name="spool retention",
            next_run_time=datetime.now(timezone.utc),
        )
    for name, fn, every_s in extra_jobs or ():
        scheduler.add_job(_safe(name, fn, gate), "interval", seconds=every_s, id=name, name=name,
                          next_run_time=datetime.now(timezone.utc))
    return scheduler


class WorklistScheduler:
    """The scheduler as a component of ``pacsbridge serve`` (``name``, ``start``, ``stop``, ``healthy``)."""

    name = "worklist scheduler"

    def __init__(
        self, updater: WorklistUpdater, sessions: sessionmaker[Session], spool_dir: Path, *,
        interval_s: float, retention_days: float,
        extra_jobs: list[tuple[str, Callable[[], object], float]] | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self._scheduler = make_scheduler(
            updater, sessions, spool_dir, interval_s=interval_s, retention_days=retention_days,
            extra_jobs=extra_jobs, gate=gate,
        )
        self.interval_s = interval_s
        #: time.monotonic() when a job last finished (the daemon's watchdog checks it advances).
        self.last_beat = time.monotonic()
        self._scheduler.add_listener(self._beat, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)

    def _beat(self, _event: object) -> None:
        self.last_beat = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds since a job last finished, beyond the worklist interval (0 while on time)."""
        return max(0.0, time.monotonic() - self.last_beat - self.interval_s)

    def start(self) -> None:
        self.last_beat = time.monotonic()
        self._scheduler.start()
        log.info("worklist scheduler started (%d jobs)", len(self._scheduler.get_jobs()))

    def healthy(self) -> bool:
        return bool(self._scheduler.running)

    def stop(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
