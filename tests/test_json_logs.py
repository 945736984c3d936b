"""``log_format = "json"``: a real ``pacsbridge serve`` (receiver, worker, scheduler, HTTP) writes one JSON
object per stderr line, with the association fields on the receiver's lines and no patient data."""

from __future__ import annotations

import json
import logging
import signal
import subprocess

from dicom_support import daemon_env, free_port, make_image, pacsbridge_cmd, scu_ae, send_datasets, wait_for_port
from pipeline_support import SHIPPED_MODEL

from pacsbridge import logs

REQUIRED = {"time", "level", "logger", "message"}


def test_serve_json_logs_parse_line_by_line(tmp_path):
    port, http_port = free_port(), free_port()
    env = daemon_env(tmp_path / "data", port, PACSBRIDGE_LOG_FORMAT="json", PACSBRIDGE_WORKER_ENABLED="true",
                     PACSBRIDGE_MODEL_PATH=str(SHIPPED_MODEL), PACSBRIDGE_HTTP_PORT=str(http_port),
                     PACSBRIDGE_HTTP_HOST="127.0.0.1", PACSBRIDGE_FSYNC="false")
    proc = subprocess.Popen(pacsbridge_cmd("serve"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_port(port, 120, proc)
        image = make_image(rows=256, cols=256, seed=1)
        assert send_datasets(port, [image]) == [0]
        # A rejected association (wrong called AE title) logs a WARNING with the peer.
        assoc = scu_ae().associate("127.0.0.1", port, ae_title="SOMEONE_ELSE")
        assert assoc.is_rejected
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) >= 5
    records = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert REQUIRED <= set(record), line
        records.append(record)
    stored = [r for r in records if r["message"].startswith("stored ")]
    assert len(stored) == 1
    assert {"association", "calling_ae", "peer", "instance"} <= set(stored[0]), stored[0]
    assert stored[0]["calling_ae"] == "TESTSCU" and stored[0]["peer"].startswith("127.0.0.1:")
    accepted = next(r for r in records if "accepted" in r["message"])
    assert accepted["association"] == stored[0]["association"]
    rejected = next(r for r in records if "rejected" in r["message"])
    assert rejected["level"] == "WARNING" and rejected["peer"].startswith("127.0.0.1:")
    assert any(r["logger"].startswith("pacsbridge.inference") for r in records)  # the worker logs too
    assert "TEST-PATIENT" not in err and "Test^Patient" not in err and "ACC0001" not in err


def test_json_formatter_keeps_a_traceback_on_one_line_and_only_known_fields():
    fmt = logs.JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("pacsbridge.x", logging.ERROR, __file__, 1, "failed %s", ("it",), sys.exc_info())
    rec.__dict__["patient_name"] = "Doe^Jane"  # an unknown extra field is not written
    with logs.bound(association="abc", peer="127.0.0.1:1"):
        line = fmt.format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "failed it" and out["association"] == "abc" and "ValueError: boom" in out["exception"]
    assert "patient_name" not in out and "Doe" not in line
    assert "association" not in json.loads(fmt.format(logging.LogRecord("x", 20, "", 1, "m", (), None)))


def test_operator_line_is_json_in_json_mode(tmp_path):
    port = free_port()
    blocker = __import__("socket").socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    try:
        env = daemon_env(tmp_path / "data", port, PACSBRIDGE_LOG_FORMAT="json")
        res = subprocess.run(pacsbridge_cmd("serve"), env=env, capture_output=True, text=True, timeout=120)
    finally:
        blocker.close()
    assert res.returncode == 1
    lines = [json.loads(line) for line in res.stderr.splitlines() if line.strip()]
    assert any("cannot start" in r["message"] for r in lines)
