"""Prometheus gauges of live monitoring, read from the database at scrape time.

``pacsbridge_drift_alarm{signal}`` (1 while a drift alarm is on, from the audit trail), and per
model and calibration the live figures over the default 30-day window:
``pacsbridge_live_ppv``, ``pacsbridge_live_sensitivity`` (NaN while unknown),
``pacsbridge_live_scored_images``, ``pacsbridge_live_flagged_images``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from .drift import SIGNALS, alarm_state
from .live import live_stats

log = logging.getLogger(__name__)


class MonitoringCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session], drift: Any | None = None, cache_s: float = 10.0) -> None:
        self._sessions = sessions
        self._drift = drift
        # The live figures aggregate the history (about 0.15 s with 100,000 predictions): scrapes reuse
        # them for ``cache_s``; the drift alarm state is read fresh every time (one small query).
        self._cache_s = cache_s
        self._cached: tuple[float, dict[str, Any]] | None = None

    def describe(self) -> list:
        return []  # no collect() at registration (the database may not be there yet)

    def collect(self) -> Iterator:
        try:
            with self._sessions() as session:
                alarms = alarm_state(session)
                if self._cached is not None and time.monotonic() - self._cached[0] < self._cache_s:
                    stats = self._cached[1]
                else:
                    stats = live_stats(session)
                    self._cached = (time.monotonic(), stats)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the DB is down
            log.warning("metrics: cannot read live monitoring figures: %s", type(exc).__name__)
            return
        on = GaugeMetricFamily("pacsbridge_drift_alarm", "1 while a drift alarm is on for the signal.",
                               labels=["signal"])
        for name in SIGNALS:
            on.add_metric([name], 1.0 if name in alarms else 0.0)
        yield on
        nan = float("nan")
        families = {
            "ppv": GaugeMetricFamily("pacsbridge_live_ppv", "PPV of flags read by radiologists, last 30 days.",
                                     labels=["model", "calibration"]),
            "sensitivity": GaugeMetricFamily("pacsbridge_live_sensitivity", "Sensitivity from RIS labels or "
                                             "estimated from audit reads, last 30 days (NaN while unknown).",
                                             labels=["model", "calibration"]),
            "audits": GaugeMetricFamily("pacsbridge_live_audit_reads", "Blinded audit reads of negatives completed, "
                                        "last 30 days.", labels=["model", "calibration"]),
            "scored": GaugeMetricFamily("pacsbridge_live_scored_images", "Images scored, last 30 days.",
                                        labels=["model", "calibration"]),
            "flagged": GaugeMetricFamily("pacsbridge_live_flagged_images", "Images flagged, last 30 days.",
                                         labels=["model", "calibration"]),
        }
        for m in stats["models"]:
            w, key = m["window"], [m["model_id"], m["calibration"]]
            families["ppv"].add_metric(key, nan if w["ppv"] is None else w["ppv"])
            sens = w["sensitivity"]["value"]
            families["sensitivity"].add_metric(key, nan if sens is None else sens)
            families["scored"].add_metric(key, w["scored"])
            families["flagged"].add_metric(key, w["flagged"])
            families["audits"].add_metric(key, w["audit"]["completed"])
        yield from families.values()
