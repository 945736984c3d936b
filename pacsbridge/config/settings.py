"""The settings model: every key of the daemon, its default, bounds and checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from .destination import AE_TITLE_RE, Destination
from .roles import ROLES, parse_roles

DEFAULT_MODEL = Path(__file__).parent.parent / "models" / "pneumonia-v4.pt"


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
        from ..worklist.viewer import check_template

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
        if not AE_TITLE_RE.match(v) or not v.strip():
            raise ValueError("must be 1-16 printable characters without backslash")
        return v

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_aes(cls, v: list[str]) -> list[str]:
        for ae in v:
            if not AE_TITLE_RE.match(ae):
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

