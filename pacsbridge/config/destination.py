"""One forwarding destination (a ``[[destinations]]`` table of the config file)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 1-16 chars, no backslash/control

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
        if v is not None and (not AE_TITLE_RE.match(v) or not v.strip()):
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

