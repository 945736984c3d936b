"""The parts :mod:`pacsbridge.daemon` assembles: the component protocol, its metrics collectors and
the builders of the drift monitor and the forwarder from the settings."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

from pacsbridge.config import Settings
from pacsbridge.store.diskguard import DiskGuard

log = logging.getLogger("pacsbridge.daemon")


@runtime_checkable
class Component(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class DiskGuardCollector:
    """``/metrics``: C-STOREs refused below the free-space floor, and the spool's last measured free space."""

    def __init__(self, guard: DiskGuard) -> None:
        self.guard = guard

    def collect(self) -> Iterator:  # prometheus_client Collector protocol
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily("pacsbridge_store_refused_low_disk",
                                  "C-STOREs refused (0xA700) because spool free space was below min_free_bytes.",
                                  value=self.guard.refused)
        if self.guard.last_free is not None:
            yield GaugeMetricFamily("pacsbridge_spool_free_bytes", "Free bytes of the spool's file system "
                                    "(last measured by the disk guard).", value=self.guard.last_free)
        yield GaugeMetricFamily("pacsbridge_spool_min_free_bytes", "The free-space floor (min_free_bytes).",
                                value=self.guard.min_free_bytes)


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception (SQLAlchemy appends SQL and a URL to its messages)."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(getattr(exc, 'orig', None) or exc).__name__}: {text[0] if text else ''}"[:300]


def monitoring_job(sessions: Any, drift: Any) -> None:  # noqa: ANN401 - sessionmaker, DriftMonitor
    """The scheduler's monitoring job: link RIS labels to studies that arrived, then check drift."""
    from pacsbridge.validation.ris_labels import match_labels

    with sessions.begin() as session:
        match_labels(session)
    drift.check()


def monitoring_collector(sessions: Any, drift: Any) -> Any:  # noqa: ANN401 - MonitoringCollector
    """``/metrics``: the drift monitor's figures."""
    from pacsbridge.validation.monitor_metrics import MonitoringCollector

    return MonitoringCollector(sessions, drift)


def chain(first: Callable[[Any], Any], second: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """``first(x)`` then ``second(x)`` (when given): the worker's after-batch hook."""
    if second is None:
        return first

    def both(arg):  # noqa: ANN001, ANN202
        try:
            return first(arg)
        finally:
            second(arg)

    return both


def build_drift_monitor(settings: Settings, sessions: Any):  # noqa: ANN201, ANN401 - DriftMonitor
    """Live drift checks against the site calibration's (or the model card's) validation."""
    from pacsbridge.validation.drift import DriftLimits, DriftMonitor, load_reference

    s = settings
    try:
        reference = load_reference(s)
        if reference is None:
            log.warning("drift alarms are off: neither the model card nor a site calibration has validation rates")
    except Exception as exc:  # noqa: BLE001 - a calibration problem stops the worker with its own message
        log.warning("drift alarms are off: no reference (%s)", first_line(exc))
        reference = None
    return DriftMonitor(sessions, reference, DriftLimits(
        window_images=s.drift_window_images, window_days=s.drift_window_days, min_images=s.drift_min_images,
        z=s.drift_z))


def build_forwarder(settings: Settings, sessions: Any, leader: Any = None,  # noqa: ANN401
                    registry: Any = None) -> Component:  # noqa: ANN401
    """The outbox sender (pacsbridge/forward/) for the configured destinations; ``leader`` is the
    scheduler's Leadership (the forwarder sends only while this node leads)."""
    from pacsbridge.forward.forwarder import ForwardMetrics, Forwarder
    from pacsbridge.forward.outbox import RetryPolicy
    from pacsbridge.forward.senders import ForwardContext
    from pacsbridge.model.artifact import load_model

    s = settings
    ctx = ForwardContext(ae_title=s.ae_title, spool_dir=Path(s.spool_dir),
                         load_model=lambda: load_model(s.model_path, s.device), tls_min_version=s.tls_min_version,
                         tls_ca=s.dicom_tls_ca, tls_client_cert=s.dicom_tls_client_cert,
                         tls_client_key=s.dicom_tls_client_key, max_decoded_bytes=s.max_decoded_bytes)
    policy = RetryPolicy(initial_s=s.outbox_retry_initial_s, max_s=s.outbox_retry_max_s,
                         max_age=timedelta(hours=s.outbox_max_age_hours))
    return Forwarder(sessions, s.destinations, ctx, policy=policy, interval_s=s.outbox_interval_s,
                     metrics=ForwardMetrics(registry, sessions), lease_s=s.outbox_lease_s,
                     node=leader.node if leader else None, gate=leader.is_leader if leader else None)
