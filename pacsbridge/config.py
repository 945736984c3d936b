"""Settings: one TOML file plus ``PACSBRIDGE_<KEY>`` environment overrides, validated once at start.

Precedence (highest first): environment variables, the TOML file, built-in defaults.  The file
comes from ``--config`` or ``PACSBRIDGE_CONFIG``, else ``/etc/pacsbridge/pacsbridge.toml`` when it
exists; without one the defaults run the daemon with SQLite in ``./var`` and the shipped model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsError, PydanticBaseSettingsSource, SettingsConfigDict

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 1-16 chars, no backslash/control

DEFAULT_MODEL = Path(__file__).parent / "models" / "pneumonia-v4.pt"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the problem."""


#: The parts of ``pacsbridge serve`` a node may run (``roles``, ``serve --roles``).
ROLES = ("receiver", "worker", "scheduler", "api")


def parse_roles(text: str) -> list[str]:
    """``"receiver,worker"`` -> ["receiver", "worker"]; ValueError naming an unknown role."""
    roles = [r.strip().lower() for r in text.split(",") if r.strip()]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (known: {', '.join(ROLES)})")
    if not roles:
        raise ValueError(f"at least one role is needed ({', '.join(ROLES)})")
    return list(dict.fromkeys(roles))


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HL7_ID_RE = re.compile(r"^[^|^~\\&\r\n]{0,180}$")  # no HL7 delimiters (we do not escape ids)


class Destination(BaseModel):
    """One place results are forwarded to (a ``[[destinations]]`` table); see pacsbridge/forward/."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique name (letters, digits, _ . -); used in the outbox and logs.")
    kind: Literal["dicom", "hl7"]
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    send: Literal["positives", "all"] = "positives"
    # DICOM: the peer's AE title and what to send for each result.
    ae_title: str | None = None
    objects: list[Literal["sr", "heatmap", "images"]] = Field(default_factory=lambda: ["sr"])
    # HL7: MSH-5/6 (receiving) and MSH-3/4 (sending) application and facility.
    receiving_application: str = ""
    receiving_facility: str = ""
    sending_application: str = "PACSBRIDGE"
    sending_facility: str = ""
    # HL7: MSH-18 and the matching encoding of the bytes on the wire (UTF-8, Latin-1 or ASCII).
    hl7_encoding: Literal["UNICODE UTF-8", "8859/1", "ASCII"] = "UNICODE UTF-8"
    timeout_s: float = Field(30.0, gt=0, le=600, description="Connect/association/DIMSE/ACK timeout.")
    max_per_association: int = Field(20, ge=1, le=1000, description="Objects sent over one association/connection.")
    # DICOM TLS for this destination (SECURITY.md): the server is verified against tls_ca_file (or the
    # system store) and, with tls_check_hostname, its certificate must name `host`; tls_cert_file and
    # tls_key_file are our client certificate for mutual TLS.  The minimum version is tls_min_version.
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_check_hostname: bool = True

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-' (starting with a letter or digit)")
        return v

    @field_validator("ae_title")
    @classmethod
    def _check_peer_ae(cls, v: str | None) -> str | None:
        if v is not None and (not _AE_RE.match(v) or not v.strip()):
            raise ValueError("must be 1-16 printable characters without backslash")
        return v

    @field_validator("receiving_application", "receiving_facility", "sending_application", "sending_facility")
    @classmethod
    def _check_hl7_id(cls, v: str) -> str:
        if not _HL7_ID_RE.match(v):
            raise ValueError("must not contain HL7 delimiters (| ^ ~ \\ &) or line breaks")
        return v

    @model_validator(mode="after")
    def _check_kind(self) -> "Destination":
        if self.kind == "dicom":
            if not self.ae_title:
                raise ValueError("ae_title is required when kind = 'dicom'")
            if not self.objects:
                raise ValueError("objects must name at least one of 'sr', 'heatmap', 'images'")
            if len(set(self.objects)) != len(self.objects):
                raise ValueError("objects lists an object twice")
        if self.tls and self.kind != "dicom":
            raise ValueError("tls: only DICOM destinations can use TLS")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self


class Settings(BaseSettings):
    """Every setting of the daemon.  Each key ``foo`` may be set as ``PACSBRIDGE_FOO``."""

    model_config = SettingsConfigDict(env_prefix="PACSBRIDGE_", extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("./var"), description="Spool and the default SQLite database live here (logs go to stderr).")
    spool_dir: Path | None = Field(None, description="Where received files are kept; default <data_dir>/spool. "
                                   "Several nodes on one database share one spool (e.g. an NFS mount).")
    database_url: str = Field("", description="SQLAlchemy URL; empty = sqlite:///<data_dir>/pacsbridge.db")
    ae_title: str = Field("PACSBRIDGE", description="Our DICOM Application Entity title.")
    bind_address: str = Field("", description="Deprecated: sets dicom_host and http_host unless they are set.")
    dicom_port: int = Field(11112, ge=1, le=65535)
    http_port: int = Field(8080, ge=0, le=65535, description="0 disables the HTTP server.")
    http_host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    http_tls_cert: str = Field("", description="PEM certificate: serve HTTPS instead of HTTP.")
    http_tls_key: str = Field("", description="PEM private key of http_tls_cert.")
    http_max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest HTTP request body accepted.")
    http_header_timeout_s: float = Field(10.0, gt=0, le=3600, description="Seconds a request's headers may take "
                                         "to arrive (from connect, or from the first byte after a response).")
    http_body_timeout_s: float = Field(30.0, gt=0, le=3600, description="Seconds a request's body may take after "
                                       "its headers.")
    http_max_connections: int = Field(400, ge=1, le=100_000, description="Open HTTP connections at most, in all.")
    http_max_connections_per_peer: int = Field(50, ge=1, le=100_000, description="Open HTTP connections at most "
                                               "from one IP address (raise it behind a reverse proxy).")
    http_keep_alive_s: float = Field(5.0, ge=1, le=3600, description="An idle kept-alive HTTP connection is closed "
                                     "after this.")
    allowed_calling_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Calling AE titles allowed to associate; empty = accept all (warned)."
    )
    max_pdu: int = Field(4_194_304, ge=16_384, le=134_217_728, description="Maximum PDU we receive (bytes).")
    max_associations: int = Field(16, ge=1, le=512)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)
    fsync: bool = Field(True, description="fsync each stored file and its folder before acknowledging.")
    # Hardening (SECURITY.md): where and whom we listen to, and how much a peer may make us hold.
    dicom_host: str = Field("0.0.0.0", description="Address the DICOM listener(s) bind to.")
    check_called_ae: bool = Field(True, description="Reject associations whose called AE title is not ours.")
    max_associations_per_peer: int = Field(8, ge=1, le=512, description="Associations at once from one address.")
    acse_timeout: float = Field(30.0, gt=0, description="ARTIM: seconds to wait for A-ASSOCIATE/A-RELEASE PDUs "
                                "(the A-ASSOCIATE-RQ must be complete within it, counted from connect).")
    pdu_deadline_floor_s: float = Field(5.0, gt=0, le=3600, description="Seconds a whole PDU may take to arrive, "
                                        "at least (counted from its first byte).")
    pdu_deadline_per_mib_s: float = Field(10.0, ge=0, le=3600, description="Seconds per MiB of its announced "
                                          "length a PDU may take, when that is more than pdu_deadline_floor_s.")
    max_dataset_bytes: int = Field(134_217_728, ge=65_536, description="Largest data set of one C-STORE.")
    max_inflated_bytes: int = Field(134_217_728, ge=65_536, description="Largest inflated deflate data set.")
    max_decoded_bytes: int = Field(134_217_728, ge=65_536, description="Largest decoded image (header and codestream: "
                                   "Rows x Columns x frames x samples x bytes), for the worker, previews and heatmaps.")
    max_concurrent_renders: int = Field(2, ge=1, le=64, description="Image previews (image.png) rendered at once; "
                                        "more get 503.")
    dicom_tls_port: int = Field(0, ge=0, le=65535, description="DICOM TLS listener port; 0 = no TLS listener.")
    dicom_tls_only: bool = Field(False, description="Listen only with TLS (no plain dicom_port).")
    dicom_tls_cert: str = Field("", description="PEM certificate (chain) of our DICOM TLS listener.")
    dicom_tls_key: str = Field("", description="PEM private key of dicom_tls_cert.")
    dicom_tls_ca: str = Field("", description="PEM CA bundle: verifies client certs, and servers we call.")
    dicom_tls_verify_client: bool = Field(False, description="Mutual TLS: require a client cert from dicom_tls_ca.")
    dicom_tls_client_cert: str = Field("", description="PEM certificate we present when we call out over TLS.")
    dicom_tls_client_key: str = Field("", description="PEM private key of dicom_tls_client_cert.")
    tls_min_version: str = Field("1.2", description="Lowest TLS version accepted or offered: 1.2 or 1.3.")
    ups_enabled: bool = Field(True, description="Offer the worklist as DICOM UPS (pull) on the same AE and port.")

    model_path: Path = Field(DEFAULT_MODEL, description="Model artifact (.pt) with its .json card beside it.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda'.")
    inference_batch_size: int = Field(8, ge=1, le=256)
    inference_max_wait_ms: int = Field(20, ge=0, le=10_000)
    worker_enabled: bool = Field(True, description="Run the inference worker inside `pacsbridge serve`.")
    mode: Literal["live", "shadow"] = Field(
        "live", description="'shadow': every image is received, scored and recorded, but nothing goes on the "
        "worklist or to the destinations (a silent trial before go-live); 'live': results are acted on.")
    inference_max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts at an instance that hits a fault of the system before it is left failed.")
    inference_retry_base_s: float = Field(
        15.0, ge=0, le=3600, description="Wait before the 2nd attempt after a fault; doubles for each further one.")
    # Several workers on one database: a claim holds for claim_lease_s unless its holder's heartbeat renews it.
    claim_lease_s: float = Field(
        60.0, ge=2, le=3600, description="A worker's claim on an instance holds this long without a heartbeat; then "
        "any running worker returns it to the queue (a failed attempt, as with any lost claim).")
    heartbeat_s: float = Field(
        10.0, ge=0.1, le=600, description="How often a worker renews its claims and reports itself (`pacsbridge "
        "workers`); at most half of claim_lease_s.  Live: a heartbeat within 3 x heartbeat_s.")
    age_gate: bool = Field(True, description="Refuse patients outside the model card's intended-use age range.")
    ood_gate: bool = Field(True, description="Refuse images whose out-of-distribution score is over the model's threshold.")
    # Site validation (`pacsbridge validate`) and the site calibration it writes.
    site_calibration: Path | None = Field(
        None, description="Site calibration file (from `pacsbridge validate --write-calibration`): its threshold "
        "and out-of-distribution cut replace the model card's; unset = the model's own.")
    validation_min_per_class: int = Field(
        50, ge=1, description="A calibration is written only with at least this many pneumonia and normal labelled "
        "images (or studies) scored.")
    validation_max_unusable_share: float = Field(
        0.1, ge=0, le=1, description="`validate` stops (exit 2) when more than this share of label rows is unusable.")
    validation_confidence: float = Field(
        0.80, gt=0.5, lt=1, description="One-sided confidence that the proposed site threshold meets the target "
        "sensitivity (lower Wilson bound). Higher buys certainty about sensitivity with flagged normals.")

    # Live monitoring (pacsbridge.validation.drift): the recent window and its binomial control limits.
    drift_window_images: int = Field(200, ge=10, le=100_000, description="Drift window: at most this many most "
                                     "recent images (scored or refused)...")
    drift_window_days: float = Field(7.0, gt=0, le=365, description="... and none older than this many days.")
    drift_min_images: int = Field(50, ge=1, le=100_000, description="No drift judgement on fewer images than this.")
    drift_z: float = Field(3.0, gt=0, le=10, description="Control limits: reference ± this many standard errors.")
    monitor_interval_s: float = Field(20.0, gt=0, le=86_400, description="How often drift is checked and RIS "
                                      "labels are matched to studies that arrived.")
    # Audit reads (pacsbridge.worklist.audit): a share of the negatives goes to a blinded read.
    audit_fraction: float = Field(0.02, ge=0, le=1, description="Share of studies scored negative that become a "
                                  "blinded quality-audit item (chosen by a hash of the Study Instance UID); 0 = off.")
    audit_max_per_day: int = Field(20, ge=0, le=100_000, description="Most audit items made per day (UTC).")
    scheduler_interval_s: float = Field(2.0, gt=0, description="How often positives become worklist items.")
    priority_max_wait_minutes: float = Field(240.0, gt=0, description="After this wait an item rises to the top.")
    retention_days: float = Field(30.0, ge=0, description="Delete spooled files older than this; 0 = keep forever.")
    claim_timeout_minutes: float = Field(
        30.0, gt=0, le=24 * 60, description="A reader's claim on a worklist item lapses after this (HTTP and UPS).")

    log_level: str = Field("INFO")
    log_format: str = Field("text", description="'text' (one readable line) or 'json' (one JSON object per line).")
    min_free_bytes: int = Field(
        2 * 1024**3, ge=0, description="Refuse C-STORE (0xA700) while the spool's file system has less free "
        "space than this (bytes); 0 = no floor.")
    loop_stall_s: float = Field(
        300.0, gt=0, le=86_400, description="A work loop (inference worker, scheduler) that has not gone round for "
        "this long fails /readyz and stops the systemd watchdog pings.")
    viewer_url: str = Field("", description="Link that opens a study in the site's viewer: a URL with "
                            "{study_instance_uid} and/or {accession_number}; empty = no link.")

    destinations: list[Destination] = Field(
        default_factory=list, description="Where results are forwarded ([[destinations]] tables; env: JSON list)."
    )
    outbox_interval_s: float = Field(1.0, gt=0, le=3600, description="How often due outbox entries are sent.")
    outbox_retry_initial_s: float = Field(5.0, gt=0, description="First retry delay after a transient failure.")
    outbox_retry_max_s: float = Field(600.0, gt=0, description="Longest delay between retries (backoff cap).")
    outbox_max_age_hours: float = Field(24.0, gt=0, description="A result still failing after this is dead.")
    # Several nodes on one PostgreSQL (README "Several nodes").
    roles: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(ROLES), description="What `pacsbridge serve` runs on this node: receiver, "
        "worker, scheduler, api (env: comma-separated).")
    leader_retry_s: float = Field(5.0, gt=0, le=300, description="How often a standby node tries to become the "
                                  "scheduler leader (and the leader checks its lock).")
    outbox_lease_s: float = Field(120.0, ge=5, le=86_400, description="A claimed outbox entry returns to the "
                                  "other nodes after this when its sender died (renewed per association).")

    @field_validator("roles", mode="before")
    @classmethod
    def _split_roles(cls, v: Any) -> Any:
        return parse_roles(v) if isinstance(v, str) else v

    @field_validator("roles")
    @classmethod
    def _check_roles(cls, v: list[str]) -> list[str]:
        return parse_roles(",".join(v))

    @field_validator("viewer_url")
    @classmethod
    def _check_viewer_url(cls, v: str) -> str:
        from .worklist.viewer import check_template

        return check_template(v.strip())

    @field_validator("site_calibration", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        # PACSBRIDGE_SITE_CALIBRATION="" (or site_calibration = "") means none, not the current directory.
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _split_aes(cls, v: Any) -> Any:
        # Only environment variables reach here as strings (a TOML string is refused in load_settings):
        # PACSBRIDGE_ALLOWED_CALLING_AES="PACS1,CR_ROOM2" or a JSON list '["PACS1", "CR_ROOM2"]'.
        if isinstance(v, str):
            if v.strip().startswith("["):
                try:
                    return json.loads(v)
                except ValueError as exc:
                    raise ValueError(f"not a JSON list: {exc}") from None
            return [a.strip() for a in v.split(",") if a.strip()]
        return v

    @field_validator("tls_min_version")
    @classmethod
    def _check_tls_version(cls, v: str) -> str:
        if v not in {"1.2", "1.3"}:
            raise ValueError("must be '1.2' or '1.3'")
        return v

    @field_validator("dicom_tls_cert", "dicom_tls_key", "dicom_tls_ca", "dicom_tls_client_cert",
                     "dicom_tls_client_key", "http_tls_cert", "http_tls_key")
    @classmethod
    def _check_pem_file(cls, v: str) -> str:
        if v and not Path(v).is_file():
            raise ValueError(f"file {v} does not exist")
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

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, v: str) -> str:
        v = v.lower()
        if v not in {"text", "json"}:
            raise ValueError("must be 'text' or 'json'")
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

    @field_validator("destinations")
    @classmethod
    def _unique_destinations(cls, v: list[Destination]) -> list[Destination]:
        seen: set[str] = set()
        for d in v:
            if d.name in seen:
                raise ValueError(f"two destinations are named {d.name!r}")
            seen.add(d.name)
        return v

    @model_validator(mode="after")
    def _check_tls(self) -> "Settings":
        if self.dicom_tls_only and not self.dicom_tls_port:
            raise ValueError("dicom_tls_only needs dicom_tls_port")
        if self.dicom_tls_port and not (self.dicom_tls_cert and self.dicom_tls_key):
            raise ValueError("dicom_tls_port needs dicom_tls_cert and dicom_tls_key")
        if self.dicom_tls_port and self.dicom_tls_port == self.dicom_port and not self.dicom_tls_only:
            raise ValueError("dicom_tls_port must differ from dicom_port")
        if self.dicom_tls_verify_client and not self.dicom_tls_ca:
            raise ValueError("dicom_tls_verify_client needs dicom_tls_ca (the CA bundle client certificates are checked against)")
        if bool(self.dicom_tls_client_cert) != bool(self.dicom_tls_client_key):
            raise ValueError("dicom_tls_client_cert and dicom_tls_client_key go together")
        if bool(self.http_tls_cert) != bool(self.http_tls_key):
            raise ValueError("http_tls_cert and http_tls_key go together")
        return self

    @model_validator(mode="after")
    def _check_lease(self) -> "Settings":
        if self.heartbeat_s * 2 > self.claim_lease_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s:g}) must be at most half of claim_lease_s "
                             f"({self.claim_lease_s:g}): one late heartbeat must not lose a worker its claims")
        return self

    @model_validator(mode="after")
    def _deprecated_bind_address(self) -> "Settings":
        # bind_address used to set both listeners; it still does, unless the new keys are set.
        if self.bind_address:
            if "dicom_host" not in self.model_fields_set:
                self.dicom_host = self.bind_address
            if "http_host" not in self.model_fields_set:
                self.http_host = self.bind_address
        return self

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'pacsbridge.db').resolve()}"
        if self.spool_dir is None:
            self.spool_dir = self.data_dir / "spool"
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # A config file's values come in as init values (load_settings), minus those the environment sets.
        return init_settings, env_settings


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
