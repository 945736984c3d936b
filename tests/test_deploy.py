"""deploy/: the example config documents every setting and is itself valid; the unit is hardened."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pacsbridge.config import Settings, load_settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_example_config_lists_every_key_and_is_valid(tmp_path, monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("PACSBRIDGE_")]:
        monkeypatch.delenv(key)
    text = (DEPLOY / "pacsbridge.example.toml").read_text()
    assert tomllib.loads(text) == {}, "every key in the example is commented out"
    commented = dict(re.findall(r"^# (\w+) = (.+?)(?:[ \t]+#.*)?$", text, flags=re.M))
    missing = set(Settings.model_fields) - set(commented)
    assert not missing, f"deploy/pacsbridge.example.toml lacks {sorted(missing)}"
    uncommented = tmp_path / "all.toml"
    uncommented.write_text("".join(f"{k} = {v}\n" for k, v in commented.items() if k in Settings.model_fields))
    settings = load_settings(uncommented)
    assert settings.allowed_calling_aes == ["PACS_MAIN", "CR_ROOM_1"]


def test_systemd_unit():
    unit = (DEPLOY / "pacsbridge.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "User=pacsbridge", "ProtectSystem=strict",
                 "ReadWritePaths=/var/lib/pacsbridge", "PrivateTmp=true", "NoNewPrivileges=true",
                 "Restart=on-failure"):
        assert re.search(rf"^{re.escape(line)}$", unit, flags=re.M), line
    assert re.search(r"^WatchdogSec=\d+", unit, flags=re.M)
    assert re.search(r"^ExecStart=\S+/pacsbridge --config /etc/pacsbridge/pacsbridge.toml serve$", unit, flags=re.M)


def test_site_config_holds_the_data_dir_and_the_unit_uses_it(monkeypatch):
    """Admin commands find the daemon's data: the unit takes its settings from the file every command
    reads by default (/etc/pacsbridge/pacsbridge.toml), not from its own environment."""
    for key in [k for k in __import__("os").environ if k.startswith("PACSBRIDGE_")]:
        monkeypatch.delenv(key)
    site = DEPLOY / "pacsbridge.toml"
    assert tomllib.loads(site.read_text())["data_dir"] == "/var/lib/pacsbridge"
    assert str(load_settings(site).data_dir) == "/var/lib/pacsbridge"
    unit = (DEPLOY / "pacsbridge.service").read_text()
    assert "PACSBRIDGE_DATA_DIR" not in unit
    assert "install -D -m 0644 deploy/pacsbridge.toml /etc/pacsbridge/pacsbridge.toml" in unit
    assert "sudo -u pacsbridge pacsbridge" in unit
    from pacsbridge.config import DEFAULT_CONFIG_FILE
    assert str(DEFAULT_CONFIG_FILE) == "/etc/pacsbridge/pacsbridge.toml"
