"""Reading the settings: the config file (TOML), ``PACSBRIDGE_<KEY>`` overrides, one-line errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from .destination import Destination
from .settings import Settings


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


#: Settings naming files or folders: a relative value in a config file is relative to that file's folder
#: (so every command given the same --config finds the same data, from any working directory).
PATH_KEYS = ("data_dir", "model_path", "site_calibration", "dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca", "dicom_tls_client_cert",
             "dicom_tls_client_key", "http_tls_cert", "http_tls_key")


def _check_toml_lists(data: dict[str, Any], path: Path) -> None:
    """A list setting written as a TOML string ("PACS1") is an error, not a silent one-item list."""
    for key, info in Settings.model_fields.items():
        if key in data and getattr(info.annotation, "__origin__", None) is list and not isinstance(data[key], list):
            raise ConfigError(
                f"invalid configuration: {key} (PACSBRIDGE_{key.upper()}): in {path} it must be a TOML list, "
                f'e.g. {key} = ["PACS1", "CR_ROOM2"] (a comma-separated string is only for the environment '
                "variable)")


def _check_toml_booleans(data: dict[str, Any], path: Path) -> None:
    """A boolean setting must be TOML true or false: "yes" or 1 is refused rather than guessed."""
    def check(model: type[BaseModel], table: dict[str, Any], where: str) -> None:
        for key, info in model.model_fields.items():
            if info.annotation is bool and key in table and not isinstance(table[key], bool):
                env = f" (PACSBRIDGE_{key.upper()})" if model is Settings else ""
                raise ConfigError(f"invalid configuration: {where}{key}{env}: in {path} it must be true or false "
                                  f"(without quotes), not {table[key]!r}")

    check(Settings, data, "")
    for i, entry in enumerate(data.get("destinations") or []):
        if isinstance(entry, dict):
            name = entry.get("name")
            check(Destination, entry, f"destinations[{i}]" + (f" {name!r}" if isinstance(name, str) else "") + ".")


def _relative_to_config(data: dict[str, Any], path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in PATH_KEYS:
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute() \
                and f"PACSBRIDGE_{key.upper()}" not in os.environ:
            out[key] = str((path.resolve().parent / value))
    return out


#: Read when neither --config nor PACSBRIDGE_CONFIG names a file and it exists (the systemd setup's
#: file, so admin commands find the daemon's data without repeating its settings).
DEFAULT_CONFIG_FILE = Path("/etc/pacsbridge/pacsbridge.toml")


def config_path(config_file: str | Path | None = None) -> Path | None:
    """The config file in use: ``--config``, else ``PACSBRIDGE_CONFIG``, else
    :data:`DEFAULT_CONFIG_FILE` when it exists (``PACSBRIDGE_CONFIG=""`` turns that off), else None."""
    if config_file:
        return Path(config_file)
    env = os.environ.get("PACSBRIDGE_CONFIG")
    if env is not None:
        return Path(env) if env else None
    default = Path(os.environ.get("PACSBRIDGE_DEFAULT_CONFIG", DEFAULT_CONFIG_FILE))
    return default if default.is_file() else None


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read, merge and validate the settings; raises :class:`ConfigError` naming the bad key."""
    path = config_path(config_file)
    if path is not None:
        overrides = {**_from_file(Path(path)), **overrides}
    try:
        return Settings(**overrides)
    except SettingsError as exc:  # e.g. PACSBRIDGE_DESTINATIONS that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        key = field.group(1) if field else "config"
        raise ConfigError(f"invalid configuration: {key} (PACSBRIDGE_{key.upper()}): not valid JSON "
                          f"({exc.__cause__ or exc})") from None
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = _destination_key(err["loc"], path) or ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            env_key = str(err["loc"][0]) if err["loc"] else key.split(".")[0]
            problems.append(f"{key} (PACSBRIDGE_{env_key.upper()}): {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def _from_file(path: Path) -> dict[str, Any]:
    """The settings a TOML config file gives, with relative paths made relative to the file; keys the
    environment sets are left out (PACSBRIDGE_<KEY> wins over the file)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    try:
        import tomllib

        data = tomllib.loads(path.read_text())
    except Exception as exc:  # noqa: BLE001 - report any parse failure with the file name
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _check_toml_lists(data, path)
    _check_toml_booleans(data, path)
    data = {**data, **_relative_to_config(data, path)}
    in_env = {k.upper() for k in os.environ}  # environment names are matched without regard to case
    return {k: v for k, v in data.items() if f"PACSBRIDGE_{k.upper()}" not in in_env}


def _destination_key(loc: tuple, config_file: Path | None) -> str | None:
    """``destinations[1] 'ris'.port`` for an error inside a destination entry (its index and name)."""
    if len(loc) < 2 or loc[0] != "destinations" or not isinstance(loc[1], int):
        return None
    name = None
    try:  # the entry's name, from wherever the list came from (environment first, as in the settings)
        raw = os.environ.get("PACSBRIDGE_DESTINATIONS")
        if raw is not None:
            import json

            entries = json.loads(raw)
        elif config_file is not None:
            import tomllib

            entries = tomllib.loads(Path(config_file).read_text()).get("destinations", [])
        else:
            entries = []
        name = entries[loc[1]].get("name")
    except Exception:  # noqa: BLE001 - the name is a courtesy; the index is enough
        pass
    key = f"destinations[{loc[1]}]" + (f" {name!r}" if isinstance(name, str) else "")
    rest = ".".join(str(p) for p in loc[2:])
    return f"{key}.{rest}" if rest else key
