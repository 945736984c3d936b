"""The admin's tools over a real daemon (``pacsbridge serve`` as a subprocess, DCMTK and pynetdicom
peers on loopback): the new /metrics counters for rejected associations, rejected stores, refused
images and forwards; ``pacsbridge events`` (table, --json, --kind, --since); ``instances`` and
``worklist`` column headers; quiet logs (no alembic chatter, one INFO line per forward); the default
config file; strict booleans in the config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt

from pipeline_support import export_model, reuid, sample_file, synthetic_chest
from test_daemon_pipeline import REPO, Daemon, _sessions, _wait_scored

pytestmark = pytest.mark.slow
SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pacsbridge", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)


class Sink:
    """A real DICOM Storage SCP (pynetdicom) that accepts the forwarded SR."""

    def __init__(self) -> None:
        self.received: list[str] = []
        ae = AE(ae_title="SINK")
        for ctx in StoragePresentationContexts[:100]:
            ae.add_supported_context(ctx.abstract_syntax)
        ae.add_supported_context(SR)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:  # noqa: ANN001
        self.received.append(str(event.request.AffectedSOPClassUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def site(tmp_path: Path):
    if shutil.which("storescu") is None or shutil.which("echoscu") is None:
        pytest.skip("DCMTK storescu/echoscu not installed (apt-get install dcmtk)")
    sink = Sink()
    dests = [{"name": "sink", "kind": "dicom", "host": "127.0.0.1", "port": sink.port, "ae_title": "SINK",
              "send": "all", "objects": ["sr"]}]
    data = tmp_path / "data"
    data.mkdir()
    # A small test model (no age range, no OOD statistics): the synthetic chest is scored, the hand
    # refused by the quality gate.
    daemon = Daemon(data, export_model(tmp_path / "model"), PACSBRIDGE_ALLOWED_CALLING_AES="STORESCU,TESTSCU",
                    PACSBRIDGE_DESTINATIONS=json.dumps(dests), PACSBRIDGE_OUTBOX_INTERVAL_S="0.5",
                    PACSBRIDGE_DEVICE="cpu")
    try:
        yield daemon, sink, tmp_path
    finally:
        daemon.stop()
        sink.stop()


def test_counters_events_and_logs_over_a_real_daemon(site) -> None:
    daemon, sink, tmp_path = site
    admin = daemon.token("root", "admin")
    # 1. An association from an AE title that is not allowed.
    r = subprocess.run(["echoscu", "-aet", "ROGUE", "-aec", "PACSBRIDGE", "127.0.0.1", str(daemon.dicom_port)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    # 2. A C-STORE of an image SOP class without pixel data: refused with a failure status.
    ds = synthetic_chest(5, study_uid="1.2.826.0.1.79.5")
    del ds.PixelData
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", daemon.dicom_port, ae_title="PACSBRIDGE")
    assert assoc.is_established
    status = int(assoc.send_c_store(ds).Status)
    assoc.release()
    assert status >= 0xA000
    # 3. An adult hand (pydicom-data RG3): not a chest, refused; 4. a chest image: scored and forwarded.
    d = tmp_path / "in"
    d.mkdir()
    hand = reuid(sample_file("RG3_UNCR.dcm"), d / "hand.dcm", study_uid="1.2.826.0.1.79.9")
    chest = d / "chest.dcm"
    synthetic_chest(1, study_uid="1.2.826.0.1.79.1").save_as(chest, enforce_file_format=True)
    daemon.send(hand, chest)
    sessions = _sessions(daemon.data_dir)
    _wait_scored(sessions, 2)

    import time
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{daemon.url}/metrics", headers=admin, timeout=10).text
        if _metric(text, "pacsbridge_forwards_total", destination="sink", outcome="sent") >= 1:
            break
        time.sleep(0.3)
    assert _metric(text, "pacsbridge_associations_rejected_total", reason="calling_ae_title") == 1
    assert _metric(text, "pacsbridge_stores_rejected_total", status=f"0x{status:04X}") == 1
    refused = {m.group(1): float(m.group(2)) for m in
               re.finditer(r'^pacsbridge_refusals_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)}
    assert refused == {"body_part": 1}, refused
    assert _metric(text, "pacsbridge_forwards_total", destination="sink", outcome="sent") == 1
    assert sink.received == [SR]
    assert "# TYPE pacsbridge_associations_rejected_total counter" in text

    # pacsbridge events, as an admin at a terminal and as a script.
    env = daemon.env
    table = _cli(env, "events")
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0]
    assert header.split()[:4] == ["at", "(UTC)", "level", "kind"]
    assert "association_rejected" in table.stdout and "calling AE title not in allowed_calling_aes" in table.stdout
    rows = json.loads(_cli(env, "events", "--json").stdout)
    assert all({"at", "kind", "level", "actor", "detail"} <= set(r) for r in rows)
    kinds = {r["kind"] for r in rows}
    assert {"association_rejected", "store_rejected", "not_analysed", "user_created"} <= kinds
    only = json.loads(_cli(env, "events", "--json", "--kind", "store_rejected").stdout)
    assert [r["kind"] for r in only] == ["store_rejected"] and f"0x{status:04X}" in only[0]["detail"]
    assert json.loads(_cli(env, "events", "--json", "--since", "2000-01-01", "--limit", "2").stdout) == rows[:2]
    assert json.loads(_cli(env, "events", "--json", "--since", "2999-01-01").stdout) == []
    bad = _cli(env, "events", "--since", "last tuesday")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "--since" in bad.stderr
    bad = _cli(env, "events", "--limit", "0")
    assert bad.returncode == 1 and "--limit" in bad.stderr and "Traceback" not in bad.stderr

    # Column headers on instances and worklist; patient, age and accession on the worklist.
    inst = _cli(env, "instances")
    assert inst.returncode == 0 and inst.stdout.splitlines()[0].split()[:4] == ["id", "received", "(UTC)", "state"]
    wl = _cli(env, "worklist", "--all")
    assert wl.returncode == 0, wl.stderr
    if "worklist is empty" not in wl.stdout:
        assert {"patient", "age", "accession"} <= set(wl.stdout.splitlines()[0].split())
    # Quiet logs: no alembic INFO on commands, none in the daemon; one INFO line for the forward.
    for out in (table, inst, wl):
        assert "alembic" not in out.stderr and "INFO" not in out.stderr, out.stderr
    logs = daemon.logs()
    assert "INFO alembic" not in logs and "INFO highdicom" not in logs
    forwarded = [ln for ln in logs.splitlines() if "INFO" in ln and "forwarded sr" in ln]
    assert len(forwarded) == 1 and "to sink (dicom)" in forwarded[0]
    assert "Test^" not in forwarded[0] and "1.2.826.0.1.79" not in forwarded[0]  # no patient data, no UIDs


def test_events_needs_an_existing_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env.update(PACSBRIDGE_DATA_DIR=str(tmp_path / "nowhere"), PACSBRIDGE_DEFAULT_CONFIG=str(tmp_path / "none.toml"))
    r = _cli(env, "events")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "no pacsbridge database" in r.stderr
    assert not (tmp_path / "nowhere").exists()  # a read command creates nothing


def test_default_config_file_is_read_when_nothing_else_is_given(tmp_path: Path) -> None:
    data = tmp_path / "var-lib"
    cfg = tmp_path / "etc" / "pacsbridge.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'data_dir = "{data}"\nlog_level = "WARNING"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env["PACSBRIDGE_DEFAULT_CONFIG"] = str(cfg)
    assert _cli(env, "db", "upgrade").returncode == 0
    assert (data / "pacsbridge.db").is_file()  # the default file's data_dir, not ./var
    assert _cli(env, "users", "add", "root", "--role", "admin").returncode == 0
    rows = json.loads(_cli(env, "events", "--json").stdout)
    assert rows[0]["kind"] == "user_created"
    # PACSBRIDGE_CONFIG="" turns the default file off: back to ./var (which does not exist here).
    off = _cli({**env, "PACSBRIDGE_CONFIG": ""}, "events")
    assert off.returncode == 1 and "no pacsbridge database" in off.stderr
    # --config wins over the default file.
    other = tmp_path / "other.toml"
    other.write_text(f'data_dir = "{tmp_path / "elsewhere"}"\n')
    assert _cli(env, "--config", str(other), "events").returncode == 1


@pytest.mark.parametrize("line, key", [('fsync = "yes"', "fsync"), ("worker_enabled = 1", "worker_enabled"),
                                       ('[[destinations]]\nname = "p"\nkind = "dicom"\nhost = "h"\nport = 104\n'
                                        'tls = "true"', "destinations[0] 'p'.tls")])
def test_booleans_in_the_config_file_are_strict(tmp_path: Path, line: str, key: str) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text(line + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    r = _cli(env, "--config", str(cfg), "status")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "true or false" in lines[0], lines
