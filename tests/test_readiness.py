"""``/readyz`` names each check and fails the one whose cause is made real: the spool replaced by a
file, the schema downgraded, the database behind a cut TCP proxy (PostgreSQL), a work loop that stops
advancing (which also stops the systemd watchdog pings).  A real daemon in this process, real HTTP."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from dicom_support import TcpProxy, free_port, postgres_schema_url, postgres_unavailable_reason
from waiting import wait_until

from pacsbridge.config import load_settings
from pacsbridge.daemon import Daemon
from pacsbridge.store import migrations

CHECKS = {"database", "migrations", "spool", "model", "components", "scheduler", "scheduler_leader_known"}


def _settings(tmp_path: Path, **over):  # noqa: ANN003, ANN202
    base = dict(data_dir=tmp_path / "data", dicom_port=free_port(), http_port=free_port(), dicom_host="127.0.0.1",
                http_host="127.0.0.1", worker_enabled=False, fsync=False, min_free_bytes=1024 * 1024)
    base.update(over)
    return load_settings(None, **base)


class Running:
    def __init__(self, settings) -> None:  # noqa: ANN001
        self.daemon = Daemon(settings)
        self.daemon.start()
        self.url = f"http://127.0.0.1:{settings.http_port}/readyz"

    def get(self) -> httpx.Response:
        return httpx.get(self.url, timeout=20)

    def wait(self, status: int, timeout: float = 20.0) -> dict:
        last: list[httpx.Response] = []

        def answers() -> bool:
            last[:] = [self.get()]
            return last[0].status_code == status

        wait_until(answers, timeout, lambda: f"/readyz to answer {status}, last {last[0].status_code}: {last[0].text}",
                   interval=0.2)
        return last[0].json()

    def stop(self) -> None:
        self.daemon.stop()


@pytest.fixture
def running(tmp_path):
    started: list[Running] = []

    def start(**over) -> Running:  # noqa: ANN003
        r = Running(_settings(tmp_path, **over))
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def test_all_checks_pass_and_are_named(running, tmp_path):
    body = running().wait(200)
    assert body["status"] == "ready" and body["failing"] == []
    assert set(body["checks"]) == CHECKS
    assert all(c["ok"] for c in body["checks"].values())
    assert "pid" in body["checks"]["scheduler"]["detail"]
    # An open route: no file path or database URL in it.
    assert str(tmp_path) not in str(body) and ":///" not in str(body)


def test_spool_made_a_file_fails_spool_only(running, tmp_path):
    r = running()
    spool = tmp_path / "data" / "spool"
    moved = spool.rename(tmp_path / "data" / "spool.moved")
    spool.write_text("not a folder")
    body = r.wait(503)
    assert body["failing"] == ["spool"] and "not a folder" in body["checks"]["spool"]["detail"]
    spool.unlink()
    moved.rename(spool)
    r.wait(200)


def test_spool_read_only_fails_spool(running, tmp_path):
    r = running()
    tmp = tmp_path / "data" / "spool" / "tmp"
    tmp.rename(tmp.with_name("tmp.moved"))
    tmp.symlink_to("/proc/self")  # a folder no one can create files in, root included
    body = r.wait(503)
    assert body["failing"] == ["spool"] and "cannot write" in body["checks"]["spool"]["detail"]
    tmp.unlink()
    tmp.with_name("tmp.moved").rename(tmp)
    r.wait(200)


def test_schema_behind_head_fails_migrations(running):
    r = running()
    migrations.downgrade(r.daemon.engine, "0006")
    body = r.wait(503)
    assert body["failing"] == ["migrations"] and "0006" in body["checks"]["migrations"]["detail"]
    migrations.upgrade(r.daemon.engine)
    r.wait(200)


def test_database_unreachable_fails_database(running):
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    proxy = TcpProxy(target_port=5432)
    proxy.start()
    try:
        with postgres_schema_url() as direct:
            url = direct.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
            r = running(database_url=url)
            r.wait(200)
            proxy.stop()
            body = r.wait(503, timeout=40)
            assert "database" in body["failing"] and "migrations" in body["failing"]
            proxy.start()
            r.wait(200, timeout=40)
            r.stop()  # before the schema is dropped
    finally:
        proxy.stop()


def test_model_loading_then_loaded(tmp_path):
    daemon = Daemon(_settings(tmp_path, worker_enabled=True))
    daemon.prepare()
    before = {c.name: c for c in daemon.readiness()}
    assert not before["model"].ok and "loading" in before["model"].detail
    assert not before["components"].ok
    daemon.start()
    try:
        after = {c.name: c for c in daemon.readiness()}
        assert after["model"].ok and "loaded pneumonia" in after["model"].detail
        assert all(c.ok for c in after.values()), after
    finally:
        daemon.stop()


def test_stalled_scheduler_fails_readiness_and_stops_watchdog(tmp_path, monkeypatch):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s while healthy
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    settings = _settings(tmp_path, scheduler_interval_s=0.2, loop_stall_s=1.0)
    daemon = Daemon(settings)
    thread = threading.Thread(target=daemon.run, kwargs={"install_signal_handlers": False}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.http_port}/readyz"

    def pings(seconds: float) -> int:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                n += sock.recv(4096) == b"WATCHDOG=1"
            except (TimeoutError, socket.timeout):
                pass
        return n

    try:
        wait_until(lambda: daemon.components, 30, "the daemon's components to start")
        assert httpx.get(url, timeout=10).status_code == 200
        assert pings(1.0) >= 3
        sched = next(c for c in daemon.components if c.name == "worklist scheduler")
        sched._scheduler.pause()  # jobs stop running: the loop no longer advances
        r = wait_until(lambda: (r := httpx.get(url, timeout=10)).status_code == 503 and r, 10,
                       "readiness to fail once the scheduler stalls (loop_stall_s = 1 s)", interval=0.2)
        assert r.status_code == 503 and set(r.json()["failing"]) == {"components", "scheduler"}, r.text
        assert "has not advanced" in r.json()["checks"]["components"]["detail"]
        pings(0.3)  # drain a ping sent just before the check
        assert pings(1.0) == 0
        sched._scheduler.resume()
        wait_until(lambda: httpx.get(url, timeout=10).status_code == 200, 15,
                   "ready again after the scheduler resumed", interval=0.2)
        assert pings(1.0) >= 3
    finally:
        daemon.request_stop()
        thread.join(60)
        sock.close()
