"""Prometheus metrics of the pipeline, in their own registry (no module globals).

Counts of stored/predicted/not-analysed/failed instances and failed attempts are read from the database at scrape time, so
they are right across restarts and with several worker processes; the decode/inference timing
histograms are observed by this process's worker.
"""

from __future__ import annotations

import logging
from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from ..store import events as event_counts
from ..store import queue
from ..store.records import instance_state_counts
from ..worklist.items import count_items

log = logging.getLogger(__name__)

_MS_BUCKETS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class _DatabaseCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._event_counts = event_counts.EventCounts()

    def collect(self) -> Iterator:
        try:
            with self._sessions() as session:
                counts = instance_state_counts(session)
                failed_attempts = queue.failed_attempts(session)
                items = count_items(session)
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the DB is down
            log.warning("metrics: cannot read counts: %s", type(exc).__name__)
            return
        for name, key, doc in (
            ("pacsbridge_instances_stored", "received", "Instances stored and recorded."),
            ("pacsbridge_instances_predicted", "predicted", "Instances with a prediction."),
            ("pacsbridge_instances_not_analysed", "not_analysed", "Instances whose image was refused (scope, data, size, quality, intended use)."),
        ):
            yield CounterMetricFamily(name, doc, value=counts[key])
        yield GaugeMetricFamily("pacsbridge_instances_pending", "Instances waiting for the worker.", value=counts["pending"])
        yield GaugeMetricFamily("pacsbridge_instances_failed",
                                "Instances left failed by a fault of the system (waiting for a retry or given up).",
                                value=counts["failed"])
        yield GaugeMetricFamily("pacsbridge_instances_retry_waiting",
                                "Failed instances with an automatic retry still to come.", value=counts["retry_waiting"])
        yield CounterMetricFamily("pacsbridge_instance_failed_attempts",
                                  "Scoring attempts that ended in a fault of the system (each is retried while "
                                  "attempts are left).", value=failed_attempts)
        yield GaugeMetricFamily("pacsbridge_worklist_items", "Open worklist items.", value=items)
        yield from _event_counters(self._sessions, self._event_counts)


_EVENT_COUNTERS = (
    ("associations_rejected", "pacsbridge_associations_rejected", "Associations rejected, by reason class.", "reason"),
    ("stores_rejected", "pacsbridge_stores_rejected", "C-STOREs answered with a failure status, by status.",
     "status"),
    ("refusals", "pacsbridge_refusals", "Images not analysed, by reason code (an image refused for several "
     "reasons counts under each).", "reason"),
)


def _event_counters(sessions: sessionmaker[Session], counts: event_counts.EventCounts) -> Iterator:
    """Counters of what was refused, from the audit trail (pacsbridge.store.events.EventCounts)."""
    try:
        with sessions() as session:
            read = counts.read(session)
    except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the DB is down
        log.warning("metrics: cannot read event counts: %s", type(exc).__name__)
        return
    for key, name, doc, label in _EVENT_COUNTERS:
        family = CounterMetricFamily(name, doc, labels=[label])
        for value, n in sorted(read[key].items()):
            family.add_metric([value], n)
        yield family


class PipelineMetrics:
    """The registry served on ``/metrics`` and the histograms the worker observes."""

    def __init__(self, sessions: sessionmaker[Session] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.decode_ms = Histogram(
            "pacsbridge_decode_ms", "Time to decode one instance to a model image (ms).",
            buckets=_MS_BUCKETS, registry=self.registry,
        )
        self.inference_ms = Histogram(
            "pacsbridge_inference_ms", "Model time per instance, amortized over its batch (ms).",
            buckets=_MS_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "pacsbridge_inference_batch_size", "Instances per inference batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )
        if sessions is not None:
            self.registry.register(_DatabaseCollector(sessions))
