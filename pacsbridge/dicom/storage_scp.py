"""Storage SCP: the DICOM listener of ``pacsbridge serve`` (C-ECHO, C-STORE of chest radiographs, UPS pull).

This module wires the listener: the AE with its presentation contexts, the plain and TLS servers and
their limits, start and stop.  The C-STORE handler (durable storage before success) is in
:mod:`.store_handler`, the peer side (who calls, why an association was refused) in :mod:`.peer_policy`;
their public names stay importable from here.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.uid import (
    UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage, Verification,
)
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge.dicom import compat
from pacsbridge.dicom.fast_transport import TransportLimits
from pacsbridge.dicom.listener import BoundedAssociationServer, FastRequestHandler
from pacsbridge.dicom.metadata import DEFAULT_MAX_INFLATED_BYTES
from pacsbridge.dicom.peer_policy import (
    bind_association, handle_accepted, handle_rejected, peer_of, rejection_reason,
)
from pacsbridge.dicom.store_handler import (
    IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION, StoreContext, encode_file_meta, handle_echo, handle_store,
)
from pacsbridge.dicom.ups_scp import UpsContext, add_ups_contexts, log_access, ups_handlers
from pacsbridge.store.diskguard import DiskGuard
from pacsbridge.store.notifier import StoreNotifier
from pacsbridge.store.records import record_event
from pacsbridge.store.spool import Spool

__all__ = [  # the handlers and helpers moved to store_handler / peer_policy stay importable from here
    "ACCEPTED_TRANSFER_SYNTAXES", "IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION", "STORAGE_SOP_CLASSES",
    "StorageSCP", "StoreContext", "bind_association", "encode_file_meta", "handle_accepted", "handle_echo",
    "handle_rejected", "handle_store", "peer_of", "rejection_reason", "storage_scp_from_settings",
    "ups_context_from_settings",
]

log = logging.getLogger(__name__)

STORAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

# Every transfer syntax pacsbridge can decode (pydicom + pylibjpeg-openjpeg/-rle + python-gdcm).
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


class StorageSCP:
    """The DICOM listener as a daemon component: ``start()``, ``stop()``, ``healthy()``."""

    name = "storage-scp"

    def __init__(
        self, *, ae_title: str, bind_address: str, port: int, spool: Spool, sessions: sessionmaker[Session],
        allowed_calling_aes: list[str] | tuple[str, ...] = (), max_pdu: int = 4_194_304,
        max_associations: int = 16, dimse_timeout: float = 60.0, network_timeout: float = 60.0,
        stop_timeout: float = 60.0, notifier: StoreNotifier | None = None,
        check_called_ae: bool = True, max_associations_per_peer: int = 8, acse_timeout: float = 30.0,
        max_dataset_bytes: int = 134_217_728, max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
        tls_context: ssl.SSLContext | None = None, tls_port: int | None = None, tls_only: bool = False,
        ups: UpsContext | None = None, pdu_deadline_floor: float = 5.0, pdu_deadline_per_mib: float = 10.0,
        disk_guard: DiskGuard | None = None,
    ) -> None:
        self.disk_guard = disk_guard
        self.ae_title = ae_title
        self.bind_address = bind_address
        self.requested_port = port
        self.spool = spool
        self.sessions = sessions
        self.allowed = tuple(allowed_calling_aes)
        self.max_pdu = max_pdu
        self.max_associations = max_associations
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self.stop_timeout = stop_timeout
        self.notifier = notifier
        self.check_called_ae = check_called_ae
        self.acse_timeout = acse_timeout
        self.max_inflated_bytes = max_inflated_bytes
        self.tls_context = tls_context
        self.requested_tls_port = tls_port if tls_context is not None else None
        self.tls_only = tls_only and tls_context is not None
        self.limits = TransportLimits(
            max_pdu=max_pdu, max_dataset_bytes=max_dataset_bytes, read_timeout=network_timeout,
            pdu_deadline_floor=pdu_deadline_floor, pdu_deadline_per_mib=pdu_deadline_per_mib,
            max_associations=max_associations, max_associations_per_peer=max_associations_per_peer,
            on_refused=self._record_refusal,
        )
        self._server: BoundedAssociationServer | None = None
        self._tls_server: BoundedAssociationServer | None = None
        self.ups = ups  # DICOM UPS pull of the worklist on the same AE (None: not offered)

    def _record_refusal(self, kind: str, reason: str, peer: str) -> None:
        record_event(self.sessions, kind, reason[:2000], level="warning", peer=peer)

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION
        ae.maximum_pdu_size = self.max_pdu
        ae.maximum_associations = self.max_associations
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.acse_timeout = self.acse_timeout
        ae.require_calling_aet = list(self.allowed)
        ae.require_called_aet = self.check_called_ae
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        if self.ups is not None:
            add_ups_contexts(ae)
        return ae

    def start(self) -> None:
        compat.configure_pynetdicom()  # once per process (the receive path relies on in-memory data sets)
        ctx = StoreContext(spool=self.spool, sessions=self.sessions, notifier=self.notifier, max_inflated_bytes=self.max_inflated_bytes,
                           disk_guard=self.disk_guard)
        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [ctx]),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_REJECTED, handle_rejected, [self.sessions, self.allowed, self.check_called_ae]),
        ]
        if self.ups is not None:
            handlers += ups_handlers(self.ups)
        # One AE for both listeners: max_associations counts the plain and the TLS ones together.
        ae = self._make_ae()
        try:
            if not self.tls_only:
                self._server = self._listen(ae, handlers, self.requested_port, None)
            if self.tls_context is not None:
                self._tls_server = self._listen(ae, handlers, self.requested_tls_port or 0, self.tls_context)
        except BaseException:
            self.stop()
            raise
        log.info("DICOM Storage SCP %s listening on %s (max PDU %d bytes, max data set %d bytes)", self.ae_title,
                 ", ".join(f"{self.bind_address}:{p}{' (TLS)' if tls else ''}" for p, tls in
                           ((self.port, False), (self.tls_port, True)) if p is not None),
                 self.max_pdu, self.limits.max_dataset_bytes)
        if self.ups is not None:
            log_access(self.ups)

    def _listen(self, ae: AE, handlers: list, port: int, context: ssl.SSLContext | None) -> BoundedAssociationServer:
        # start_server(block=False), but with our fast and bounded classes via pynetdicom's server hooks.
        try:
            server = ae.make_server((self.bind_address, port), evt_handlers=handlers, ae_title=self.ae_title,
                                    ssl_context=context, server_class=BoundedAssociationServer,
                                    request_handler=FastRequestHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen for DICOM{' TLS' if context else ''} on "
                          f"{self.bind_address}:{port}: {exc.strerror or exc}") from None
        server.pb_limits = self.limits
        name = f"{self.name}-{'tls-' if context else ''}listener"
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
        compat.register_server(ae, server)
        return server

    @property
    def port(self) -> int | None:
        """The bound plain port (useful when started on port 0); None when listening with TLS only."""
        if self.tls_only:
            return None
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port; None without TLS."""
        if self.tls_context is None:
            return None
        if self._tls_server is None:
            return self.requested_tls_port
        return int(self._tls_server.server_address[1])

    def association_count(self) -> int:
        """Associations being served now, plain and TLS together (0 when not listening)."""
        server = self._server or self._tls_server
        if server is None:
            return 0
        return sum(1 for a in server.ae.active_associations if a.is_acceptor)

    def healthy(self) -> bool:
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        return bool(servers) and all(s.socket is not None and s.socket.fileno() != -1 for s in servers)

    def stop(self) -> None:
        """Stop accepting associations, then let the in-flight ones finish (up to ``stop_timeout``)."""
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        self._server = self._tls_server = None
        if not servers:
            return
        for server in servers:
            server.shutdown()  # closes the listening socket; running associations keep going
        deadline = time.monotonic() + self.stop_timeout
        active = list(servers[0].ae.active_associations)
        if active:
            log.info("waiting for %d association(s) to finish", len(active))
        while active and time.monotonic() < deadline:
            for assoc in active:
                if not assoc.is_established:
                    compat.end_idle(assoc)
            time.sleep(0.05)
            active = [a for a in active if a.is_alive() and a.is_established]
        for assoc in active:
            log.warning("association with %s still running after %.0f s; aborting it",
                        f"{assoc.requestor.ae_title}@{assoc.requestor.address}", self.stop_timeout)
            assoc.abort()
        log.info("DICOM Storage SCP stopped")


def storage_scp_from_settings(
    settings: Any,  # pacsbridge.config.Settings
    sessions: sessionmaker[Session], spool: Spool | None = None, notifier: StoreNotifier | None = None,
    disk_guard: DiskGuard | None = None,
) -> StorageSCP:
    from pacsbridge.dicom.tls import server_context

    tls = server_context(settings) if settings.dicom_tls_port else None
    return StorageSCP(
        ae_title=settings.ae_title, bind_address=settings.dicom_host, port=settings.dicom_port,
        spool=spool or Spool(Path(settings.spool_dir), fsync=settings.fsync), sessions=sessions,
        allowed_calling_aes=settings.allowed_calling_aes, max_pdu=settings.max_pdu,
        max_associations=settings.max_associations, dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout, notifier=notifier,
        check_called_ae=settings.check_called_ae, max_associations_per_peer=settings.max_associations_per_peer,
        acse_timeout=settings.acse_timeout, max_dataset_bytes=settings.max_dataset_bytes,
        max_inflated_bytes=settings.max_inflated_bytes,
        tls_context=tls, tls_port=settings.dicom_tls_port, tls_only=settings.dicom_tls_only,
        ups=ups_context_from_settings(settings, sessions),
        pdu_deadline_floor=settings.pdu_deadline_floor_s, pdu_deadline_per_mib=settings.pdu_deadline_per_mib_s,
        disk_guard=disk_guard,
    )


def ups_context_from_settings(settings, sessions: sessionmaker[Session]) -> UpsContext | None:  # noqa: ANN001
    """The UPS pull context (same claim timeout as the HTTP API), or None when ``ups_enabled`` is off."""
    if not getattr(settings, "ups_enabled", True):
        return None
    return UpsContext(sessions=sessions, claim_timeout_s=settings.claim_timeout_minutes * 60.0)
