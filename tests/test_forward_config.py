"""Destinations in the configuration (TOML tables, PACSBRIDGE_DESTINATIONS JSON), errors naming the
entry and field, start-up refusing an invalid one (exit 2), and outbox counts in /metrics."""

from __future__ import annotations

import json
import subprocess

import pytest
from fastapi.testclient import TestClient

from dicom_support import daemon_env, free_port, pacsbridge_cmd
from forward_support import add_result, migrated_sessions
from pacsbridge.config import ConfigError, load_settings
from pipeline_support import sample_file


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("PACSBRIDGE_"):
            monkeypatch.delenv(key)


TOML = """
[[destinations]]
name = "pacs"
kind = "dicom"
host = "pacs.example.org"
port = 104
ae_title = "MAIN_PACS"
objects = ["sr", "heatmap", "images"]

[[destinations]]
name = "ris"
kind = "hl7"
host = "ris.example.org"
port = 2575
receiving_application = "RIS"
send = "all"
"""


def test_toml_tables_and_env_json(tmp_path, monkeypatch):
    cfg = tmp_path / "pb.toml"
    cfg.write_text(TOML)
    s = load_settings(cfg)
    assert [(d.name, d.kind, d.port, d.send) for d in s.destinations] == [
        ("pacs", "dicom", 104, "positives"), ("ris", "hl7", 2575, "all")]
    assert s.destinations[0].objects == ["sr", "heatmap", "images"] and s.destinations[1].receiving_application == "RIS"
    assert load_settings().destinations == []
    monkeypatch.setenv("PACSBRIDGE_DESTINATIONS", json.dumps(
        [{"name": "orthanc", "kind": "dicom", "host": "127.0.0.1", "port": 4242, "ae_title": "ORTHANC"}]))
    s = load_settings(cfg)  # the environment wins over the file
    assert [(d.name, d.objects) for d in s.destinations] == [("orthanc", ["sr"])]


@pytest.mark.parametrize("entry, expected", [
    ({"name": "pacs", "kind": "dicom", "host": "h", "port": 104}, r"destinations\[0\] 'pacs'.*ae_title is required"),
    ({"name": "pacs", "kind": "dicom", "host": "h", "port": 0, "ae_title": "X"}, r"destinations\[0\] 'pacs'\.port"),
    ({"name": "pacs", "kind": "dicom", "host": "h", "port": 1, "ae_title": "X", "objects": ["sr", "pdf"]},
     r"destinations\[0\] 'pacs'\.objects\.1"),
    ({"name": "pacs", "kind": "fax", "host": "h", "port": 1}, r"destinations\[0\] 'pacs'\.kind"),
    ({"name": "ris", "kind": "hl7", "host": "h", "port": 1, "recieving_application": "RIS"},
     r"destinations\[0\] 'ris'\.recieving_application.*unknown key"),
    ({"name": "ris", "kind": "hl7", "host": "h", "port": 1, "receiving_application": "R|S"},
     r"destinations\[0\] 'ris'\.receiving_application.*delimiters"),
    ({"name": "pacs", "kind": "dicom", "host": "h", "port": 1, "ae_title": "X", "tls": True,
      "tls_ca_file": "/nonexistent/ca.pem"},
     r"destinations\[0\] 'pacs'.*tls_ca_file: no such file"),
    ({"name": "bad name!", "kind": "hl7", "host": "h", "port": 1}, r"destinations\[0\] 'bad name!'\.name"),
])
def test_invalid_entry_names_the_entry_and_field(tmp_path, monkeypatch, entry, expected):
    monkeypatch.setenv("PACSBRIDGE_DESTINATIONS", json.dumps([entry]))
    with pytest.raises(ConfigError, match=expected) as info:
        load_settings()
    assert "PACSBRIDGE_DESTINATIONS" in str(info.value)


def test_duplicate_names_and_toml_entry_errors(tmp_path):
    cfg = tmp_path / "pb.toml"
    cfg.write_text(TOML.replace('name = "ris"', 'name = "pacs"'))
    with pytest.raises(ConfigError, match="two destinations are named 'pacs'"):
        load_settings(cfg)
    cfg.write_text(TOML.replace("port = 2575", "port = 99999"))
    with pytest.raises(ConfigError, match=r"destinations\[1\] 'ris'\.port"):
        load_settings(cfg)


def test_serve_refuses_an_invalid_destination_with_exit_2(tmp_path):
    env = daemon_env(tmp_path / "data", free_port(), PACSBRIDGE_DESTINATIONS='[{"name": "pacs", "kind": "dicom", '
                     '"host": "127.0.0.1", "port": 104}]')
    res = subprocess.run(pacsbridge_cmd("serve"), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "destinations[0] 'pacs'" in res.stderr and "ae_title" in res.stderr
    assert not (tmp_path / "data").exists()  # nothing started
    res = subprocess.run(pacsbridge_cmd("serve"), env={**env, "PACSBRIDGE_DESTINATIONS": "[not json"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "destinations" in res.stderr.lower(), res.stderr


def test_outbox_counts_in_metrics(tmp_path):
    from pacsbridge.api.app import create_app
    from pacsbridge.auth.users import create_user
    from pacsbridge.config import Destination
    from pacsbridge.forward.forwarder import ForwardMetrics
    from pacsbridge.inference.metrics import PipelineMetrics

    sessions = migrated_sessions(tmp_path)
    ris = Destination(name="ris", kind="hl7", host="127.0.0.1", port=1)
    pacs = Destination(name="pacs", kind="dicom", host="127.0.0.1", port=1, ae_title="P", objects=["sr", "images"])
    add_result(sessions, tmp_path / "spool", sample_file("RG1_UNCR.dcm"), [ris, pacs])
    metrics = PipelineMetrics(sessions)
    ForwardMetrics(metrics.registry, sessions)
    with sessions.begin() as session:  # /metrics needs a monitor (or admin) token
        _, token = create_user(session, "prometheus", "monitor")
    text = TestClient(create_app(sessions, metrics)).get(
        "/metrics", headers={"Authorization": f"Bearer {token}"}).text
    assert 'pacsbridge_outbox_entries{state="pending"} 3.0' in text
    assert 'pacsbridge_outbox_entries{state="dead"} 0.0' in text
