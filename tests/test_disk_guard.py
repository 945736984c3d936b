"""The free-space floor (``min_free_bytes``) on a real small file system (a 64 MiB tmpfs).

A real ``pacsbridge serve`` keeps its spool on the tmpfs (its database elsewhere); the tmpfs is filled
with a filler file until its free space is below the floor, then real SCUs (pynetdicom and DCMTK
``storescu``) send: 0xA700, nothing acknowledged lost, C-ECHO still answered, /readyz names the spool,
/metrics counts the refusals; the filler removed, the next C-STORE succeeds without a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from dicom_support import daemon_env, free_port, make_image, pacsbridge_cmd, scu_ae, send_datasets, wait_for_port
from waiting import wait_until
from pydicom import dcmwrite
from sqlalchemy import create_engine, text

from pacsbridge.store.diskguard import DiskGuard, free_space

MiB = 1024 * 1024
FLOOR = 16 * MiB


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MiB tmpfs mounted on a fresh folder (tests run as root); skipped where mounting is refused."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill_below(mnt: Path, floor: int) -> Path:
    """Write a filler file until free space is half of ``floor`` (so well under it)."""
    filler = mnt / "filler.bin"
    want = free_space(mnt).free_bytes - floor // 2
    with open(filler, "wb") as fh:
        chunk = b"\0" * MiB
        while want > 0:
            fh.write(chunk[:min(want, MiB)])
            want -= MiB
        fh.flush()
        os.fsync(fh.fileno())
    assert free_space(mnt).free_bytes < floor
    return filler


def test_guard_logs_once_per_fall_and_recovers(tmpfs, caplog):
    guard = DiskGuard(tmpfs, min_free_bytes=FLOOR, cache_s=0.0)
    assert guard.check() is None
    filler = fill_below(tmpfs, FLOOR)
    with caplog.at_level("INFO", logger="pacsbridge.store.diskguard"):
        reasons = [guard.check() for _ in range(5)]
        assert all(r and "below min_free_bytes" in r for r in reasons)
        filler.unlink()
        assert guard.check() is None
        fill_below(tmpfs, FLOOR)
        assert guard.check() is not None
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per fall, not per check
    assert "MiB" in warnings[0].getMessage()  # says how much is free
    assert any("receiving resumes" in r.getMessage() for r in caplog.records if r.levelname == "INFO")


def test_guard_cache_reads_statvfs_about_once_a_second(tmpfs):
    guard = DiskGuard(tmpfs, min_free_bytes=FLOOR, cache_s=1.0)
    assert guard.check() is None
    fill_below(tmpfs, FLOOR)
    assert guard.check() is None  # still the cached measurement
    time.sleep(1.1)  # on purpose: waits out the 1 s cache this test is about
    assert guard.check() is not None


def _metric(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def readyz(http_port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=10)


def spool_ready(http_port: int) -> bool | None:
    """Whether /readyz finds the spool fine (it reads the receiver's own guard); None while the HTTP
    server is not listening yet."""
    try:
        return "spool" not in readyz(http_port).json().get("failing", [])
    except httpx.TransportError:
        return None


def test_serve_refuses_below_the_floor_and_resumes(tmpfs, tmp_path):
    dicom_port, http_port = free_port(), free_port()
    db = tmp_path / "db.sqlite"
    env = daemon_env(tmpfs / "data", dicom_port, PACSBRIDGE_MIN_FREE_BYTES=str(FLOOR),
                     PACSBRIDGE_HTTP_PORT=str(http_port), PACSBRIDGE_HTTP_HOST="127.0.0.1",
                     PACSBRIDGE_DATABASE_URL=f"sqlite:///{db}")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(pacsbridge_cmd("serve"), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(dicom_port, 60, proc)
        before = [make_image(seed=i) for i in range(3)]
        assert send_datasets(dicom_port, before) == [0, 0, 0]

        filler = fill_below(tmpfs, FLOOR)
        # Readiness reads the receiver's own guard: once it names the spool, the guard has seen the fall.
        wait_until(lambda: spool_ready(http_port) is False, 30, "readiness to report the full spool")
        refused = [make_image(seed=10 + i) for i in range(2)]
        assoc = scu_ae().associate("127.0.0.1", dicom_port, ae_title="PACSBRIDGE")
        assert assoc.is_established
        rsps = [assoc.send_c_store(ds) for ds in refused]
        assoc.release()
        assert [int(r.Status) for r in rsps] == [0xA700, 0xA700]
        assert "min_free_bytes" in rsps[0].ErrorComment  # the reason travels with the status
        # DCMTK's storescu sees the same refusal.
        f = tmp_path / "one.dcm"
        dcmwrite(f, make_image(seed=20), enforce_file_format=True)
        res = subprocess.run(["storescu", "-v", "-aec", "PACSBRIDGE", "127.0.0.1", str(dicom_port), str(f)],
                             capture_output=True, text=True, timeout=60)
        assert "Refused: OutOfResources" in res.stdout + res.stderr, res.stdout + res.stderr

        # Still serving: C-ECHO answered; readiness names the spool; the refusals are counted.
        assoc = scu_ae().associate("127.0.0.1", dicom_port, ae_title="PACSBRIDGE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        r = readyz(http_port)
        assert r.status_code == 503 and r.json()["failing"] == ["spool"], r.text
        add = subprocess.run(pacsbridge_cmd("users", "add", "mon", "--role", "monitor", "--json"), env=env,
                             capture_output=True, text=True, timeout=60)
        assert add.returncode == 0, add.stderr
        headers = {"Authorization": f"Bearer {json.loads(add.stdout)['token']}"}
        body = httpx.get(f"http://127.0.0.1:{http_port}/metrics", headers=headers, timeout=10).text
        assert _metric(body, "pacsbridge_store_refused_low_disk_total") == 3
        assert _metric(body, "pacsbridge_spool_free_bytes") < FLOOR

        filler.unlink()
        wait_until(lambda: spool_ready(http_port), 30, "readiness to report the spool free again")
        after = [make_image(seed=30 + i) for i in range(2)]
        assert send_datasets(dicom_port, after) == [0, 0]
        assert readyz(http_port).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = log_path.read_text()
    assert proc.returncode == 0, out
    assert out.count("is below min_free_bytes") == 1, out  # one WARNING for the whole low period
    assert "receiving resumes" in out

    # Nothing acknowledged was lost; nothing refused was stored (no row, no file).
    engine = create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        stored = {row[0]: row[1] for row in conn.execute(text("SELECT sop_instance_uid, file_path FROM instances"))}
        kinds = [row[0] for row in conn.execute(text(
            "SELECT kind FROM events WHERE kind IN ('disk_low', 'disk_ok') ORDER BY id"))]
    engine.dispose()
    assert set(stored) == {str(d.SOPInstanceUID) for d in before + after}
    assert kinds == ["disk_low", "disk_ok"]  # one event per fall and per recovery, not per refusal
    spool = tmpfs / "data" / "spool"
    assert all((spool / p).is_file() for p in stored.values())
    assert [p for p in (spool / "tmp").rglob("*") if p.is_file()] == []  # none in any node's tmp folder
