"""Settings: one TOML file plus ``PACSBRIDGE_<KEY>`` environment overrides, validated once at start.

Precedence (highest first): environment variables, the TOML file, built-in defaults.  The file
comes from ``--config`` or ``PACSBRIDGE_CONFIG``; without one the defaults run the daemon with
SQLite in ``./var`` and the shipped model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 1-16 chars, no backslash/control

DEFAULT_MODEL = Path(__file__).parent / "models" / "pneumonia-v2.pt"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


class Settings(BaseSettings):
    """Every setting of the daemon.  Each key ``foo`` may be set as ``PACSBRIDGE_FOO``."""

    model_config = SettingsConfigDict(env_prefix="PACSBRIDGE_", extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("./var"), description="Spool, SQLite database and logs live here.")
    database_url: str = Field("", description="SQLAlchemy URL; empty = sqlite:///<data_dir>/pacsbridge.db")
    ae_title: str = Field("PACSBRIDGE", description="Our DICOM Application Entity title.")
    bind_address: str = Field("0.0.0.0", description="Address the DICOM and HTTP servers listen on.")
    dicom_port: int = Field(11112, ge=1, le=65535)
    http_port: int = Field(8080, ge=0, le=65535, description="0 disables the HTTP server.")
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Calling AE titles allowed to associate; empty = accept all (warned)."
    )
    max_pdu: int = Field(4_194_304, ge=0, description="Maximum PDU we receive (bytes); 0 = unlimited.")
    max_associations: int = Field(16, ge=1, le=512)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    fsync: bool = Field(True, description="fsync each stored file and its folder before acknowledging.")

    model_path: Path = Field(DEFAULT_MODEL, description="Model artifact (.pt) with its .json card beside it.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda'.")
    inference_batch_size: int = Field(8, ge=1, le=256)
    inference_max_wait_ms: int = Field(20, ge=0, le=10_000)
    worker_enabled: bool = Field(True, description="Run the inference worker inside `pacsbridge serve`.")
    age_gate: bool = Field(True, description="Refuse patients outside the model card's intended-use age range.")
    ood_gate: bool = Field(True, description="Refuse images whose out-of-distribution score is over the model's threshold.")

    scheduler_interval_s: float = Field(2.0, gt=0, description="How often positives become worklist items.")
    priority_max_wait_minutes: float = Field(240.0, gt=0, description="After this wait an item rises to the top.")
    retention_days: float = Field(30.0, ge=0, description="Delete spooled files older than this; 0 = keep forever.")

    log_level: str = Field("INFO")

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _split_aes(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [a.strip() for a in v.split(",") if a.strip()]
        return v

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        if not _AE_RE.match(v) or not v.strip():
            raise ValueError("must be 1-16 printable characters without backslash")
        return v

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_aes(cls, v: list[str]) -> list[str]:
        for ae in v:
            if not _AE_RE.match(ae):
                raise ValueError(f"{ae!r} is not a valid AE title (1-16 printable characters)")
        return v

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in {"auto", "cpu", "cuda"} and not v.startswith("cuda:"):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if v:
            from sqlalchemy.engine import make_url
            from sqlalchemy.exc import ArgumentError

            try:
                make_url(v)
            except ArgumentError as exc:
                raise ValueError(f"not a database URL: {exc}") from None
        return v

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'pacsbridge.db').resolve()}"
        return self

    # Where things live inside the data dir.
    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _CONFIG_FILE.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


_CONFIG_FILE: dict[str, Path | None] = {}


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read, merge and validate the settings; raises :class:`ConfigError` naming the bad key."""
    path = config_file or os.environ.get("PACSBRIDGE_CONFIG") or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist or is not a file")
        try:
            import tomllib

            tomllib.loads(path.read_text())
        except Exception as exc:  # noqa: BLE001 - report any parse failure with the file name
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _CONFIG_FILE["path"] = path
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(f"{key} (PACSBRIDGE_{key.split('.')[0].upper()}): {msg}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    finally:
        _CONFIG_FILE.pop("path", None)
