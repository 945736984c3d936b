"""Crash safety: SIGKILL the daemon mid-stream; every acknowledged instance survives exactly once."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

from pydicom import dcmread
from sqlalchemy import select

from dicom_support import daemon_env, free_port, make_image, pacsbridge_cmd, scu_ae, wait_for_port
from waiting import wait_until
from pacsbridge.store.db import make_engine, make_sessionmaker
from pacsbridge.store.models import Instance
from pacsbridge.store.spool import Spool

TOTAL = 200
KILL_AFTER = 60


def test_sigkill_mid_stream_loses_nothing_acknowledged(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    env = daemon_env(data, port)
    log = open(tmp_path / "daemon.log", "w")

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(pacsbridge_cmd("serve"), env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(port, 60, proc)
        return proc

    images = [make_image(rows=32, cols=32) for _ in range(TOTAL)]
    acknowledged: list[str] = []
    failures: list[str] = []
    progress = threading.Event()
    found_down = threading.Event()  # the sender has tried and failed to associate (the daemon was down)

    def sender() -> None:
        ae = scu_ae()
        assoc = None
        i = 0
        deadline = time.monotonic() + 120
        while i < TOTAL and time.monotonic() < deadline:
            if assoc is None or not assoc.is_established:
                assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE")
                if not assoc.is_established:
                    found_down.set()
                    time.sleep(0.2)  # daemon down: retry after a pause, as a PACS would
                    continue
            try:
                status = assoc.send_c_store(images[i])
            except Exception as exc:  # noqa: BLE001 - the peer vanished
                failures.append(repr(exc))
                assoc = None
                continue
            if "Status" in status and status.Status == 0x0000:
                acknowledged.append(images[i].SOPInstanceUID)
                i += 1
                if len(acknowledged) >= KILL_AFTER:
                    progress.set()
            else:
                assoc = None  # no status (aborted): send the same instance again
        if assoc is not None and assoc.is_established:
            assoc.release()

    proc = start()
    thread = threading.Thread(target=sender)
    thread.start()
    try:
        assert progress.wait(90), "sender made no progress"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        killed_at = len(acknowledged)
        # Restart only once the sender has met the daemon down, as a PACS would during a crash.
        wait_until(lambda: found_down.is_set() or not thread.is_alive(), 30, "the sender to find the daemon down")
        proc = start()
        thread.join(150)
        assert not thread.is_alive()
        assert killed_at < TOTAL, "the daemon was killed after the stream ended; the test proved nothing"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    assert proc.returncode == 0
    assert len(acknowledged) == TOTAL and len(set(acknowledged)) == TOTAL

    engine = make_engine(f"sqlite:///{(data / 'pacsbridge.db').resolve()}")
    spool = Spool(data / "spool")
    with make_sessionmaker(engine)() as s:
        rows = s.scalars(select(Instance)).all()
    engine.dispose()
    by_uid: dict[str, list[Instance]] = {}
    for row in rows:
        by_uid.setdefault(row.sop_instance_uid, []).append(row)
    for uid in acknowledged:
        assert len(by_uid.get(uid, [])) == 1, f"acknowledged instance recorded {len(by_uid.get(uid, []))} times"
    for row in rows:  # every recorded instance (acknowledged or not) has its complete file
        ds = dcmread(spool.path(row.file_path))
        assert ds.SOPInstanceUID == row.sop_instance_uid
        assert len(ds.PixelData) == 32 * 32 * 2
    # At most one orphan file: killed after its rename but before its commit (never acknowledged).
    assert len(rows) <= len(list((data / "spool").rglob("*.dcm"))) <= len(rows) + 1
    assert [p for p in spool.tmp_dir.rglob("*") if p.is_file()] == []  # nothing left in the node's tmp folder
