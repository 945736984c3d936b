"""The long-running daemon: migrate, start components in order, serve, stop them in reverse order.

A component is anything with ``name``, ``start()`` and ``stop()`` (and optionally ``healthy()``);
add new ones in :meth:`Daemon.build_components` (builders in :mod:`pacsbridge.components`).
:class:`WorkerDaemon` (``pacsbridge worker``) runs the inference worker alone, for extra worker
processes beside ``serve``.  systemd integration (READY=1, WATCHDOG=1, STOPPING=1, in
:mod:`pacsbridge.systemd`) talks to $NOTIFY_SOCKET directly, so no systemd Python package is needed.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from pathlib import Path

from pacsbridge.components import (Component, DiskGuardCollector, first_line, monitoring_collector,
                                   monitoring_job, chain, build_drift_monitor, build_forwarder)
from pacsbridge.config import ConfigError, NodeRole, Settings
from pacsbridge.dicom.compat import configure_pynetdicom
from pacsbridge.dicom.storage_scp import storage_scp_from_settings
from pacsbridge.store import migrations
from pacsbridge.store.diskguard import DiskGuard
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.notifier import StoreNotifier
from pacsbridge.store.spool import Spool
from pacsbridge.systemd import sd_notify, watchdog_interval

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start in this environment (not a configuration mistake); the message says why."""


class Daemon:
    """Owns the database engine, the spool and the components of ``pacsbridge serve``."""

    #: How its inference worker is listed by `pacsbridge workers`.
    worker_kind = "serve"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configure_pynetdicom()  # pynetdicom's process-wide settings, once, before any AE exists
        try:
            self.engine = make_engine(settings.database_url)
        except OSError as exc:  # SQLite: the data dir cannot be created
            raise StartupError(f"data_dir {Path(settings.data_dir).resolve()}: {exc.strerror or exc}") from None
        self.sessions = make_sessionmaker(self.engine)
        from pacsbridge.store.node import node_id

        # Each node writes its temporary files in a folder of its own (a spool may be shared).
        self.node_id = _node_id(settings, node_id)  # held (flock) until stop()
        self.spool = Spool(Path(settings.spool_dir), fsync=settings.fsync, node=self.node_id)
        self.leadership = None  # store.leader.Leadership, with the scheduler role (build_components)
        # The receiver notifies it after each new instance; the worker waits on it (instead of polling).
        self.notifier = StoreNotifier()
        # The receiver refuses C-STORE below the free-space floor; /readyz and /metrics read the same guard.
        self.disk_guard = DiskGuard(Path(settings.spool_dir), settings.min_free_bytes, on_change=self._disk_event)
        self.components: list[Component] = []
        self._stop = threading.Event()
        self._tmp_removed = 0  # leftovers Spool.prepare removed; reported by the orphan sweep

    def build_components(self) -> list[Component]:
        """The components in start order (stopped in reverse).  Receiving comes first: a PACS may send
        as soon as the port is open, and the worker/scheduler/API only read what was stored."""
        from pacsbridge.store.orphans import OrphanSweep

        from pacsbridge.dicom.tls import TLSConfigError

        try:
            scp = storage_scp_from_settings(self.settings, self.sessions, self.spool, notifier=self.notifier,
                                            disk_guard=self.disk_guard)
        except TLSConfigError as exc:
            raise ConfigError(str(exc)) from None
        roles = set(self.settings.roles)
        components: list[Component] = [scp] if NodeRole.RECEIVER.value in roles else []
        if NodeRole.SCHEDULER.value in roles:
            from pacsbridge.store.leader import Leadership

            # One scheduler leader across nodes; the jobs that must run once ask it before each run.
            self.leadership = Leadership(self.engine, self.sessions, retry_s=self.settings.leader_retry_s)
            components += [self.leadership, OrphanSweep(self.sessions, self.spool, tmp_removed=self._tmp_removed,
                                                        leader=self.leadership)]  # background, once, by the leader
        components += self.pipeline_components()
        return components

    def pipeline_components(self) -> list[Component]:
        """Inference worker (if enabled), worklist scheduler and HTTP API (if http_port != 0)."""
        from pacsbridge.api.app import create_app
        from pacsbridge.api.server import HttpServer, http_limits_from_settings
        from pacsbridge.inference.metrics import PipelineMetrics
        from pacsbridge.model.artifact import load_model
        from pacsbridge.worklist.items import WorklistUpdater
        from pacsbridge.worklist.scheduler import WorklistScheduler

        s = self.settings
        roles = set(s.roles)
        metrics = PipelineMetrics(self.sessions)
        metrics.registry.register(DiskGuardCollector(self.disk_guard))
        updater = WorklistUpdater(self.sessions, s.priority_max_wait_minutes, audit_fraction=s.audit_fraction,
                                  audit_max_per_day=s.audit_max_per_day)
        forwarder = self.forwarder(metrics.registry) if s.destinations and NodeRole.SCHEDULER.value in roles else None
        components: list[Component] = []
        if s.worker_enabled and NodeRole.WORKER.value in roles:
            components.append(self.inference_worker(
                updater, metrics, hint=" (or set worker_enabled = false to only receive)",
                after_batch=forwarder.wake if forwarder is not None else None))
        drift = self.drift_monitor()
        metrics.registry.register(monitoring_collector(self.sessions, drift))
        if NodeRole.SCHEDULER.value in roles:
            components.append(WorklistScheduler(
                updater, self.sessions, Path(s.spool_dir), interval_s=s.scheduler_interval_s,
                retention_days=s.retention_days, gate=self.leadership.is_leader if self.leadership else None,
                extra_jobs=[("monitoring", functools.partial(monitoring_job, self.sessions, drift),
                             s.monitor_interval_s)],
            ))
        if forwarder is not None:
            components.append(forwarder)
        if s.http_port and NodeRole.API.value in roles:
            from pacsbridge.api.security import install_security

            app = install_security(create_app(
                self.sessions, metrics, claim_timeout_s=s.claim_timeout_minutes * 60.0, spool_dir=Path(s.spool_dir),
                # Heatmaps (when the model provides them) use their own copy, loaded on first use.
                model=functools.partial(load_model, s.model_path, s.device),
                ready=lambda: bool(self.components) and self._healthy(), viewer_url=s.viewer_url,
                max_decoded_bytes=s.max_decoded_bytes, max_concurrent_renders=s.max_concurrent_renders,
                readiness=self.readiness,
                mode=s.mode, drift=drift,
            ), s)
            components.append(HttpServer(app, s.http_host, s.http_port, tls_cert=s.http_tls_cert,
                                         tls_key=s.http_tls_key, tls_min_version=s.tls_min_version,
                                         limits=http_limits_from_settings(s)))
        return components

    def drift_monitor(self):  # noqa: ANN201 - DriftMonitor
        """Live drift checks against the site calibration's (or the model card's) validation."""
        return build_drift_monitor(self.settings, self.sessions)

    def forwarder(self, registry=None) -> Component:  # noqa: ANN001
        """The outbox sender (pacsbridge/forward/) for the configured destinations."""
        return build_forwarder(self.settings, self.sessions, self.leadership, registry)

    def inference_worker(self, updater, metrics=None, hint: str = "", after_batch=None) -> Component:  # noqa: ANN001
        """The inference worker; ``updater`` puts positives on the worklist right after each batch
        (then ``after_batch``, e.g. waking the forwarder); results get their outbox entries."""
        from pacsbridge.forward.outbox import Outbox
        from pacsbridge.inference.worker import InferenceWorker
        from pacsbridge.model.artifact import ModelError
        from pacsbridge.scoring import Scorer
        from pacsbridge.store.queue import RetryPolicy
        from pacsbridge.validation.calibration import CalibrationError, load_site_model, record_calibration

        s = self.settings
        try:
            model = load_site_model(s)  # the site calibration, if configured, applies from here on
        except ModelError as exc:
            raise ConfigError(f"model_path: {exc}{hint}") from None
        except CalibrationError as exc:
            raise ConfigError(str(exc)) from None
        try:
            record_calibration(self.sessions, model, s.site_calibration)
        except Exception as exc:  # noqa: BLE001 - e.g. the database went away: the next start records it
            log.warning("could not record the calibration in force: %s", first_line(exc))
        # The one scoring path of `predict` and `validate`, decoding within max_decoded_bytes.
        return InferenceWorker(
            self.sessions, model, Path(s.spool_dir), batch_size=s.inference_batch_size,
            scorer=Scorer(model, max_decoded_bytes=s.max_decoded_bytes),
            max_wait_ms=s.inference_max_wait_ms, on_recorded=chain(updater.refresh, after_batch), metrics=metrics,
            notifier=self.notifier, outbox=Outbox(s.destinations) if s.destinations else None,
            retry_policy=RetryPolicy(max_attempts=s.inference_max_attempts, base_s=s.inference_retry_base_s),
            shadow=s.mode == "shadow",
            lease_s=s.claim_lease_s, heartbeat_s=s.heartbeat_s, kind=self.worker_kind, stall_s=s.loop_stall_s,
        )

    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        if signum is not None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
        self._stop.set()

    def prepare(self) -> None:
        """Everything before listening: schema to head, spool folders, configuration warnings."""
        try:
            migrations.upgrade(self.engine)
        except Exception as exc:  # noqa: BLE001 - unreachable server, bad credentials, read-only file...
            raise StartupError(f"cannot use the database {self._db_name()}: {first_line(exc)}") from None
        self.check_spool_marker()  # before cleaning anything in a spool that may be another cluster's
        try:
            self._tmp_removed = self.spool.prepare()
        except OSError as exc:
            raise StartupError(f"cannot use the spool {Path(self.settings.spool_dir).resolve()} (data_dir): "
                               f"{exc.strerror or exc}") from None
        if not self.settings.allowed_calling_aes:
            log.warning("allowed_calling_aes is empty: accepting associations from ANY calling AE title")
        if self.settings.mode == "shadow":
            log.warning("shadow mode: images are scored and recorded; nothing goes on the worklist or to "
                        "the destinations (set mode = \"live\" to act on results)")
        if self.settings.bind_address:
            log.warning("bind_address is deprecated: set dicom_host (now %s) and http_host (now %s) instead",
                        self.settings.dicom_host, self.settings.http_host)

    def check_spool_marker(self) -> None:
        """Refuse to start on a spool that is not the cluster's (see pacsbridge.store.spool_marker)."""
        from pacsbridge.store.spool_marker import SpoolNotTheClusters, check_spool_marker

        root = Path(self.settings.spool_dir)
        try:
            root.mkdir(parents=True, exist_ok=True)
            check_spool_marker(self.sessions, root, fsync=self.settings.fsync)
        except SpoolNotTheClusters as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot use the spool {root.resolve()} (data_dir): {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - the database went away between the checks
            raise StartupError(f"cannot use the database {self._db_name()}: {first_line(exc)}") from None

    def _db_name(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def start(self) -> None:
        self.prepare()
        self.components = self.build_components()
        started: list[Component] = []
        try:
            for component in self.components:
                try:
                    component.start()
                except (OSError, RuntimeError) as exc:  # e.g. a busy port: one clear line, no traceback
                    raise StartupError(f"{component.name}: {exc}") from None
                started.append(component)
        except BaseException:
            self._stop_all(started)
            raise
        self.components = started

    def run(self, install_signal_handlers: bool = True) -> int:
        """Start, serve until SIGTERM/SIGINT (or :meth:`request_stop`), stop cleanly; returns exit code."""
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        sd_notify("READY=1\nSTATUS=serving")
        log.info("pacsbridge is ready (%d component(s): %s)", len(self.components),
                 ", ".join(c.name for c in self.components))
        interval = watchdog_interval()
        while not self._stop.wait(interval if interval else 1.0):
            # Ping only while every component is up and its work loop still goes round: a stuck loop
            # (a hung database call, a deadlock) lets systemd's watchdog restart us.
            if interval and self._healthy() and not self._stalled(log_it=True):
                sd_notify("WATCHDOG=1")
        sd_notify("STOPPING=1")
        self.stop()
        log.info("pacsbridge stopped")
        return 0

    def stop(self) -> None:
        """Stop the started components in reverse order and release the database."""
        from pacsbridge.store.node import release

        self._stop_all(self.components)
        self.components = []
        self.engine.dispose()
        release(self.node_id)

    def _healthy(self) -> bool:
        for component in self.components:
            check = getattr(component, "healthy", None)
            if check is not None and not check():
                log.error("component %s is unhealthy; withholding the systemd watchdog ping", component.name)
                return False
        return True

    def _disk_event(self, low: bool, message: str) -> None:
        """One event per fall under the free-space floor and one per recovery (``pacsbridge events``)."""
        from pacsbridge.store.records import record_event

        record_event(self.sessions, "disk_low" if low else "disk_ok", message, level="warning" if low else "info")

    def _stalled(self, log_it: bool = False) -> list[str]:
        """Components whose work loop has not gone round for ``loop_stall_s`` (``stalled_for()``)."""
        stuck = []
        for component in self.components:
            since = getattr(component, "stalled_for", None)
            if since is not None and since() > self.settings.loop_stall_s:
                stuck.append(component.name)
                if log_it:
                    log.error("component %s has not advanced for %.0f s (loop_stall_s = %.0f); withholding the "
                              "systemd watchdog ping", component.name, since(), self.settings.loop_stall_s)
        return stuck

    def readiness(self) -> list:
        """The checks of ``/readyz`` (pacsbridge.health.Check), in a fixed order."""
        from pacsbridge import health

        # Open route: no database URL or file path in the details.
        checks = [health.check_database(self.engine, show_url=False), health.check_migrations(self.engine),
                  health.check_spool(Path(self.settings.spool_dir), self.settings.min_free_bytes, self.disk_guard,
                                     show_path=False)]
        worker = next((c for c in self.components if hasattr(c, "worker_id")), None)
        if worker is not None:
            model = getattr(worker, "_model", None)
            checks.append(health.Check("model", True, f"loaded {Path(self.settings.model_path).name}"
                                       f" (sha256 {getattr(model, 'weights_sha256', '?')[:12]}...)"))
        elif self.settings.worker_enabled and NodeRole.WORKER.value in self.settings.roles and not self.components:
            checks.append(health.Check("model", False, "loading (the daemon is starting)"))
        else:
            checks.append(health.Check("model", True, "not used here (worker_enabled = false or no worker role)"))
        down = [c.name for c in self.components
                if getattr(c, "healthy", None) is not None and not c.healthy()]
        stuck = self._stalled()
        if not self.components:
            checks.append(health.Check("components", False, "starting"))
        elif down or stuck:
            checks.append(health.Check("components", False, "; ".join(
                [f"{n} is not running" for n in down] + [f"{n} has not advanced for over "
                                                         f"{self.settings.loop_stall_s:.0f} s" for n in stuck])))
        else:
            checks.append(health.Check("components", True, ", ".join(c.name for c in self.components)))
        sched = next((c for c in self.components if c.name == "worklist scheduler"), None)
        if sched is None and self.components and NodeRole.SCHEDULER.value not in self.settings.roles:
            checks.append(health.Check("scheduler", True, "not a role of this node"))
        elif sched is None:
            checks.append(health.Check("scheduler", False, "no scheduler in this process"))
        else:
            ok = bool(getattr(sched, "healthy", lambda: True)()) and sched.name not in stuck
            checks.append(health.Check("scheduler", ok, f"this process (pid {os.getpid()})"
                                       + ("" if ok else ": not running")))
        from pacsbridge.store.leader import readiness_check

        checks.append(readiness_check(self.sessions, self.leadership))
        return checks

    def _stop_all(self, components: list[Component]) -> None:
        for component in reversed(components):
            try:
                component.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("error while stopping %s", component.name)



def _node_id(settings: Settings, make) -> str | None:  # noqa: ANN001
    try:
        return make(Path(settings.data_dir))
    except OSError as exc:
        raise StartupError(f"data_dir {Path(settings.data_dir).resolve()}: {exc.strerror or exc}") from None



class WorkerDaemon(Daemon):
    """``pacsbridge worker``: the inference worker alone (no DICOM, no HTTP, no scheduler).

    For extra worker processes beside ``serve``, sharing its database and spool.  It neither
    migrates nor creates anything: ``serve`` (or ``pacsbridge db upgrade``) owns the schema, so a
    database that is not at the latest revision stops it with a :class:`StartupError`.  It waits on
    the database (polling every 0.25 s): there is no receiver in this process to wake it.
    """

    worker_kind = "worker"

    def prepare(self) -> None:
        try:
            current, head = migrations.current_revision(self.engine), migrations.head_revision()
        except Exception as exc:  # noqa: BLE001 - unreachable server, unreadable file...
            raise StartupError(f"cannot use the database {self._db_name()}: {first_line(exc)}") from None
        if current != head:
            raise StartupError(
                f"database {self.engine.url.render_as_string(hide_password=True)} is at schema revision "
                f"{current or 'none (empty)'}, not {head}: start `pacsbridge serve` or run "
                "`pacsbridge db upgrade` first")
        if not Path(self.settings.spool_dir).is_dir():
            raise StartupError(f"spool folder {Path(self.settings.spool_dir).resolve()} does not exist: "
                               "data_dir must be the one `pacsbridge serve` uses (shared)")
        self.check_spool_marker()
        if self.engine.dialect.name == "sqlite":
            log.warning("SQLite: this worker must run on the same host as `pacsbridge serve`, and all processes "
                        "share one write lock; use PostgreSQL for several workers")

    def build_components(self) -> list[Component]:
        from pacsbridge.worklist.items import WorklistUpdater

        s = self.settings
        return [self.inference_worker(WorklistUpdater(self.sessions, s.priority_max_wait_minutes,
                                                      audit_fraction=s.audit_fraction,
                                                      audit_max_per_day=s.audit_max_per_day))]
