"""The long-running daemon: migrate, start components in order, serve, stop them in reverse order.

A component is anything with ``name``, ``start()`` and ``stop()`` (and optionally ``healthy()``);
add new ones in :meth:`Daemon.build_components`.  :class:`WorkerDaemon` (``pacsbridge worker``) runs
the inference worker alone, for extra worker processes beside ``serve``.  systemd integration (READY=1, WATCHDOG=1,
STOPPING=1) talks to $NOTIFY_SOCKET directly, so no systemd Python package is needed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

from pacsbridge.config import ConfigError, Settings
from pacsbridge.dicom.storage_scp import storage_scp_from_settings
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.notifier import StoreNotifier
from pacsbridge.store.spool import Spool

log = logging.getLogger(__name__)


@runtime_checkable
class Component(Protocol):
    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


def sd_notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd's notify socket; False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", message.split("=")[0], exc)
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when no watchdog is configured."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.1)
    except ValueError:
        return None


class StartupError(Exception):
    """The daemon cannot start in this environment (not a configuration mistake); the message says why."""


class Daemon:
    """Owns the database engine, the spool and the components of ``pacsbridge serve``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.spool = Spool(Path(settings.spool_dir), fsync=settings.fsync)
        # The receiver notifies it after each new instance; the worker waits on it (instead of polling).
        self.notifier = StoreNotifier()
        self.components: list[Component] = []
        self._stop = threading.Event()
        self._tmp_removed = 0  # leftovers Spool.prepare removed; reported by the orphan sweep

    def build_components(self) -> list[Component]:
        """The components in start order (stopped in reverse).  Receiving comes first: a PACS may send
        as soon as the port is open, and the worker/scheduler/API only read what was stored."""
        from pacsbridge.store.orphans import OrphanSweep

        components: list[Component] = [
            storage_scp_from_settings(self.settings, self.sessions, self.spool, notifier=self.notifier),
            OrphanSweep(self.sessions, self.spool, tmp_removed=self._tmp_removed),  # background, once
        ]
        components += self.pipeline_components()
        return components

    def pipeline_components(self) -> list[Component]:
        """Inference worker (if enabled), worklist scheduler and HTTP API (if http_port != 0)."""
        from pacsbridge.api.app import create_app
        from pacsbridge.api.server import HttpServer
        from pacsbridge.inference.metrics import PipelineMetrics
        from pacsbridge.worklist.items import WorklistUpdater
        from pacsbridge.worklist.scheduler import WorklistScheduler

        s = self.settings
        metrics = PipelineMetrics(self.sessions)
        updater = WorklistUpdater(self.sessions, s.priority_max_wait_minutes)
        components: list[Component] = []
        if s.worker_enabled:
            components.append(self.inference_worker(
                updater, metrics, hint=" (or set worker_enabled = false to only receive)"))
        components.append(WorklistScheduler(
            updater, self.sessions, Path(s.spool_dir), interval_s=s.scheduler_interval_s,
            retention_days=s.retention_days,
        ))
        if s.http_port:
            components.append(HttpServer(create_app(self.sessions, metrics), s.bind_address, s.http_port))
        return components

    def inference_worker(self, updater, metrics=None, hint: str = "") -> Component:  # noqa: ANN001
        """The inference worker; ``updater`` puts positives on the worklist right after each batch."""
        from pacsbridge.inference.worker import InferenceWorker
        from pacsbridge.model.artifact import ModelError, load_model

        s = self.settings
        try:
            model = load_model(s.model_path, s.device, age_gate=s.age_gate, ood_gate=s.ood_gate)
        except ModelError as exc:
            raise ConfigError(f"model_path: {exc}{hint}") from None
        return InferenceWorker(
            self.sessions, model, Path(s.spool_dir), batch_size=s.inference_batch_size,
            max_wait_ms=s.inference_max_wait_ms, on_recorded=updater.refresh, metrics=metrics,
            notifier=self.notifier,
        )

    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        if signum is not None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
        self._stop.set()

    def prepare(self) -> None:
        """Everything before listening: schema to head, spool folders, configuration warnings."""
        migrations.upgrade(self.engine)
        self._tmp_removed = self.spool.prepare()
        if not self.settings.allowed_calling_aes:
            log.warning("allowed_calling_aes is empty: accepting associations from ANY calling AE title")

    def start(self) -> None:
        self.prepare()
        self.components = self.build_components()
        started: list[Component] = []
        try:
            for component in self.components:
                component.start()
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
            if interval and self._healthy():
                sd_notify("WATCHDOG=1")
        sd_notify("STOPPING=1")
        self.stop()
        log.info("pacsbridge stopped")
        return 0

    def stop(self) -> None:
        """Stop the started components in reverse order and release the database."""
        self._stop_all(self.components)
        self.components = []
        self.engine.dispose()

    def _healthy(self) -> bool:
        for component in self.components:
            check = getattr(component, "healthy", None)
            if check is not None and not check():
                log.error("component %s is unhealthy; withholding the systemd watchdog ping", component.name)
                return False
        return True

    def _stop_all(self, components: list[Component]) -> None:
        for component in reversed(components):
            try:
                component.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("error while stopping %s", component.name)


class WorkerDaemon(Daemon):
    """``pacsbridge worker``: the inference worker alone (no DICOM, no HTTP, no scheduler).

    For extra worker processes beside ``serve``, sharing its database and spool.  It neither
    migrates nor creates anything: ``serve`` (or ``pacsbridge db upgrade``) owns the schema, so a
    database that is not at the latest revision stops it with a :class:`StartupError`.  It waits on
    the database (polling every 0.25 s): there is no receiver in this process to wake it.
    """

    def prepare(self) -> None:
        current, head = migrations.current_revision(self.engine), migrations.head_revision()
        if current != head:
            raise StartupError(
                f"database {self.engine.url.render_as_string(hide_password=True)} is at schema revision "
                f"{current or 'none (empty)'}, not {head}: start `pacsbridge serve` or run "
                "`pacsbridge db upgrade` first")
        if not Path(self.settings.spool_dir).is_dir():
            raise StartupError(f"spool folder {Path(self.settings.spool_dir).resolve()} does not exist: "
                               "data_dir must be the one `pacsbridge serve` uses (shared)")
        if self.engine.dialect.name == "sqlite":
            log.warning("SQLite: this worker must run on the same host as `pacsbridge serve`, and all processes "
                        "share one write lock; use PostgreSQL for several workers")

    def build_components(self) -> list[Component]:
        from pacsbridge.worklist.items import WorklistUpdater

        return [self.inference_worker(WorklistUpdater(self.sessions, self.settings.priority_max_wait_minutes))]
