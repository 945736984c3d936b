"""Settings: defaults, TOML file, environment overrides, errors that name the key."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from dicom_support import daemon_env, free_port, pacsbridge_cmd
from pacsbridge.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("PACSBRIDGE_"):
            monkeypatch.delenv(key)


def test_defaults():
    s = load_settings()
    assert s.ae_title == "PACSBRIDGE"
    assert s.dicom_port == 11112
    assert s.allowed_calling_aes == []
    assert s.fsync is True
    assert s.max_pdu >= 1_000_000
    assert s.database_url == f"sqlite:///{(Path('./var') / 'pacsbridge.db').resolve()}"
    assert s.spool_dir == Path("./var") / "spool"


def test_toml_file(tmp_path):
    cfg = tmp_path / "pb.toml"
    cfg.write_text('ae_title = "TRIAGE"\ndicom_port = 4242\nallowed_calling_aes = ["PACS1", "CR_ROOM2"]\n'
                   f'data_dir = "{tmp_path}"\n')
    s = load_settings(cfg)
    assert (s.ae_title, s.dicom_port, s.allowed_calling_aes) == ("TRIAGE", 4242, ["PACS1", "CR_ROOM2"])
    assert s.database_url == f"sqlite:///{tmp_path / 'pacsbridge.db'}"


def test_env_overrides_toml(tmp_path, monkeypatch):
    cfg = tmp_path / "pb.toml"
    cfg.write_text('dicom_port = 4242\nae_title = "FROMFILE"\n')
    monkeypatch.setenv("PACSBRIDGE_CONFIG", str(cfg))
    monkeypatch.setenv("PACSBRIDGE_DICOM_PORT", "5555")
    monkeypatch.setenv("PACSBRIDGE_ALLOWED_CALLING_AES", "A1, B2")
    monkeypatch.setenv("PACSBRIDGE_DATABASE_URL", "postgresql://pb@db.example/pacsbridge")
    s = load_settings()
    assert s.dicom_port == 5555 and s.ae_title == "FROMFILE"
    assert s.allowed_calling_aes == ["A1", "B2"]
    assert s.database_url == "postgresql://pb@db.example/pacsbridge"


@pytest.mark.parametrize("key, value, toml", [
    ("dicom_port", "70000", "dicom_port = 70000"),
    ("ae_title", "WAY_TOO_LONG_AE_TITLE", 'ae_title = "WAY_TOO_LONG_AE_TITLE"'),
    ("log_level", "CHATTY", 'log_level = "CHATTY"'),
    ("database_url", "not a url", 'database_url = "not a url"'),
    ("allowed_calling_aes", "OK,BAD\\AE", 'allowed_calling_aes = ["OK", "BAD\\\\AE"]'),
])
def test_invalid_value_names_the_key(tmp_path, monkeypatch, key, value, toml):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=key):
        load_settings(cfg)
    monkeypatch.setenv(f"PACSBRIDGE_{key.upper()}", value)
    with pytest.raises(ConfigError, match=f"PACSBRIDGE_{key.upper()}"):
        load_settings()


def test_unknown_key_and_bad_toml(tmp_path):
    cfg = tmp_path / "typo.toml"
    cfg.write_text("dicom_prot = 104\n")
    with pytest.raises(ConfigError, match="dicom_prot.*unknown key"):
        load_settings(cfg)
    cfg.write_text("dicom_port = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_serve_with_invalid_value_exits_nonzero_naming_the_key(tmp_path):
    env = daemon_env(tmp_path / "data", free_port(), PACSBRIDGE_MAX_ASSOCIATIONS="0")
    res = subprocess.run(pacsbridge_cmd("serve"), env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "max_associations" in res.stderr and "PACSBRIDGE_MAX_ASSOCIATIONS" in res.stderr
    assert not (tmp_path / "data").exists()  # nothing started


def test_empty_allow_list_is_warned(tmp_path, caplog):
    from pacsbridge.daemon import Daemon

    settings = load_settings(data_dir=tmp_path)
    daemon = Daemon(settings)
    with caplog.at_level(logging.WARNING):
        daemon.prepare()
    daemon.engine.dispose()
    assert any("allowed_calling_aes is empty" in r.message and r.levelno == logging.WARNING for r in caplog.records)

    caplog.clear()
    daemon = Daemon(load_settings(data_dir=tmp_path, allowed_calling_aes=["PACS1"]))
    with caplog.at_level(logging.WARNING):
        daemon.prepare()
    daemon.engine.dispose()
    assert not any("allowed_calling_aes" in r.message for r in caplog.records)
