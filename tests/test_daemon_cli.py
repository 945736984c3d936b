"""`pacsbridge serve` / `status` / `--help` as a user (or systemd) runs them: real subprocesses."""

from __future__ import annotations

import json
import signal
import socket
import subprocess

import pytest
from dicom_support import daemon_env, free_port, make_image, pacsbridge_cmd, scu_ae, send_datasets, wait_for_port
from waiting import wait_until


def test_help_explains_each_command():
    res = subprocess.run(pacsbridge_cmd("--help"), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for word in ("serve", "worker", "db", "status", "--config"):
        assert word in res.stdout
    for cmd in (["serve"], ["worker"], ["db"], ["status"], ["db", "upgrade"]):
        sub = subprocess.run(pacsbridge_cmd(*cmd, "--help"), capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0 and "usage: pacsbridge" in sub.stdout


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def _messages(sock) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except (TimeoutError, socket.timeout):
            return out


def _refused(port: int) -> bool:
    """Whether a new connection to ``port`` is refused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def test_serve_store_status_and_graceful_sigterm(tmp_path, notify_socket):
    sock, sock_path = notify_socket
    port = free_port()
    data = tmp_path / "data"
    env = daemon_env(data, port, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000")
    proc = subprocess.Popen(pacsbridge_cmd("serve"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for_port(port, 60, proc)
        assert send_datasets(port, [make_image(), make_image()]) == [0, 0]

        # An association in flight when SIGTERM arrives is allowed to finish; new ones are refused.
        ae = scu_ae()
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSBRIDGE")
        assert assoc.is_established
        assert assoc.send_c_store(make_image()).Status == 0
        messages: list[str] = []
        wait_until(lambda: messages.extend(_messages(sock)) or "WATCHDOG=1" in messages, 10, "a watchdog ping")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _refused(port), 30, "the DICOM port to close after SIGTERM")
        assert assoc.send_c_store(make_image()).Status == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assoc.release()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out and "pacsbridge stopped" in out
    assert "TEST-PATIENT" not in out and "Test^Patient" not in out  # no PHI in the log

    messages += _messages(sock)
    assert messages[0].startswith("READY=1")
    assert "WATCHDOG=1" in messages
    assert messages[-1] == "STOPPING=1"

    res = subprocess.run(pacsbridge_cmd("status", "--json"), env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["instances"] == {"received": 4, "pending": 4, "predicted": 0, "not_analysed": 0, "failed": 0,
                                  "retry_waiting": 0}
    assert status["schema"]["current"] == status["schema"]["head"]


def test_status_counts_states(tmp_path):
    """received = total stored; pending = received or processing."""
    from sqlalchemy import func, update

    from pacsbridge.store import migrations
    from pacsbridge.store.db import make_engine, make_sessionmaker
    from pacsbridge.store.models import Instance
    from dicom_support import running_receiver

    with running_receiver(tmp_path) as r:
        images = [make_image() for _ in range(5)]
        assert send_datasets(r.port, images) == [0] * 5
    engine = make_engine(f"sqlite:///{tmp_path / 'pacsbridge.db'}")
    sessions = make_sessionmaker(engine)
    with sessions.begin() as s:
        for uid, state in zip([i.SOPInstanceUID for i in images[:3]], ["processing", "predicted", "not_analysed"]):
            s.execute(update(Instance).where(Instance.sop_instance_uid == uid).values(state=state))
        s.execute(update(Instance).where(Instance.sop_instance_uid == images[1].SOPInstanceUID)
                  .values(spool_deleted_at=func.now()))  # as retention does
    assert migrations.current_revision(engine) is not None
    engine.dispose()
    env = daemon_env(tmp_path, free_port())
    res = subprocess.run(pacsbridge_cmd("status", "--json"), env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["instances"] == {"received": 5, "pending": 3, "predicted": 1, "not_analysed": 1, "failed": 0,
                                  "retry_waiting": 0}
    assert status["spool"] == {"files": 4, "deleted": 1}
