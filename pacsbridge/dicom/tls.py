"""TLS contexts for DICOM (PS3.15 Annex B.9 "Basic TLS Secure Transport Connection Profile" and later).

``server_context(settings)`` is what the Storage SCP wraps accepted connections with;
``make_client_context(...)`` is for outgoing associations (forwarding, doctor): pynetdicom takes it as
``ae.associate(host, port, tls_args=(make_client_context(...), server_hostname))``.

Only modern TLS: the minimum version is ``tls_min_version`` (1.2 by default, or 1.3), with Python's
default cipher selection (which excludes the broken ones).  Certificate verification:

* server side, ``dicom_tls_verify_client = true`` requires a client certificate signed by a CA in
  ``dicom_tls_ca`` (mutual TLS); otherwise clients are not asked for one.
* client side, the peer's certificate is always verified (against ``dicom_tls_ca`` when set, else the
  system store) and its name must match the host we called.
"""

from __future__ import annotations

import ssl
from typing import Any

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(Exception):
    """A certificate, key or CA file cannot be used; the message names it."""


def _min_version(value: str) -> ssl.TLSVersion:
    try:
        return _VERSIONS[value]
    except KeyError:
        raise TLSConfigError(f"tls_min_version must be one of {', '.join(_VERSIONS)}, not {value!r}") from None


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, what: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"{what}: cannot load certificate {cert} with key {key}: {exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca: str, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"{what}: cannot load CA bundle {ca}: {exc}") from None


def make_server_context(cert: str, key: str, *, ca: str = "", verify_client: bool = False,
                        min_version: str = "1.2") -> ssl.SSLContext:
    """A server-side context: our certificate and key, optionally requiring client certificates from ``ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _min_version(min_version)
    _load_chain(ctx, cert, key, "dicom_tls_cert/dicom_tls_key")
    if ca:
        _load_ca(ctx, ca, "dicom_tls_ca")
    if verify_client:
        if not ca:
            raise TLSConfigError("dicom_tls_verify_client needs dicom_tls_ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_client_context(*, ca: str = "", cert: str = "", key: str = "", min_version: str = "1.2",
                        check_hostname: bool = True) -> ssl.SSLContext:
    """A client-side context that verifies the server (``ca`` or the system store), optionally presenting
    our own certificate for mutual TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _min_version(min_version)
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if ca:
        _load_ca(ctx, ca, "dicom_tls_ca")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert:
        _load_chain(ctx, cert, key, "dicom_tls_client_cert/dicom_tls_client_key")
    return ctx


def server_context(settings: Any) -> ssl.SSLContext:  # noqa: ANN401 - pacsbridge.config.Settings
    """The DICOM TLS listener's context from the settings (``dicom_tls_*``, ``tls_min_version``)."""
    return make_server_context(settings.dicom_tls_cert, settings.dicom_tls_key, ca=settings.dicom_tls_ca,
                               verify_client=settings.dicom_tls_verify_client,
                               min_version=settings.tls_min_version)
