"""Storage SCP: accepts C-ECHO and C-STORE of chest radiographs and stores them durably.

An instance gets status 0x0000 only after its file is fsync'd under its final (hashed) name, the
folder is fsync'd and its rows are committed.  Anything else gets a failure status and an Event.
Handlers are plain functions; their dependencies arrive as bound pynetdicom handler arguments.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.events import Event as DicomEvent
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage, Verification,
)
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge import __version__, logs
from pacsbridge.dicom import compat
from pacsbridge.dicom.fast_transport import TransportLimits
from pacsbridge.dicom.listener import BoundedAssociationServer, FastRequestHandler
from pacsbridge.dicom.metadata import (
    DEFAULT_MAX_INFLATED_BYTES, STATUS_DATASET_TOO_LARGE, STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES_DB,
    RejectedDataset, read_metadata,
)
from pacsbridge.dicom.ups_scp import UpsContext, add_ups_contexts, log_access, ups_handlers
from pacsbridge.store.diskguard import DiskGuard
from pacsbridge.store.notifier import StoreNotifier
from pacsbridge.store.records import ReceivedInstance, record_event, record_received
from pacsbridge.store.spool import Spool, spool_relpath

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

IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.10157283921051273654")  # pydicom root + random
IMPLEMENTATION_VERSION = f"PACSBRIDGE_{__version__}"[:16]


@dataclass
class StoreContext:
    """What the C-STORE handler needs (bound into the handler, no globals)."""

    spool: Spool
    sessions: sessionmaker[Session]
    notifier: StoreNotifier | None = None  # told after each new instance is committed (wakes the worker)
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES
    disk_guard: DiskGuard | None = None  # free-space floor of the spool (None: not checked)


def peer_of(event: DicomEvent) -> str:
    """``CALLING_AE@address:port`` of the association's requestor (AE titles are not PHI)."""
    rq = event.assoc.requestor
    return f"{(rq.ae_title or '').strip()}@{rq.address}:{rq.port}"


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group for a received dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def handle_echo(event: DicomEvent) -> int:
    return 0x0000


def handle_store(event: DicomEvent, ctx: StoreContext) -> int | Dataset:
    """Store one instance durably, then (and only then) answer success."""
    started = time.perf_counter()
    req = event.request
    peer = peer_of(event)
    calling_ae = (event.assoc.requestor.ae_title or "").strip()
    sop_class = str(req.AffectedSOPClassUID or "")
    sop_instance = str(req.AffectedSOPInstanceUID or "")
    transfer_syntax = str(event.context.transfer_syntax)
    if not compat.has_log_id(event.assoc):
        bind_association(event)
    if ctx.disk_guard is not None:
        low = ctx.disk_guard.check()  # before parsing or writing anything; logged once by the guard
        if low is not None:
            ctx.disk_guard.refuse()
            log.debug("refused C-STORE from %s: 0x%04X, %s", peer, STATUS_OUT_OF_RESOURCES, low)
            return _refused(STATUS_OUT_OF_RESOURCES, low)
    try:
        if getattr(req.DataSet, "overflowed", False):  # fast_transport.CappedBuffer dropped it past the cap
            raise RejectedDataset(STATUS_DATASET_TOO_LARGE, f"data set of {req.DataSet.received} bytes exceeds "
                                  f"max_dataset_bytes ({req.DataSet.cap})")
        body = req.DataSet.getvalue() if req.DataSet is not None else b""
        meta = read_metadata(body, transfer_syntax, sop_class, sop_instance, max_inflated=ctx.max_inflated_bytes)
    except RejectedDataset as exc:
        log.warning("rejected C-STORE from %s: status 0x%04X, %s", peer, exc.status, exc.reason)
        record_event(ctx.sessions, "store_rejected", f"status 0x{exc.status:04X}: {exc.reason}", level="warning",
                     peer=peer, sop_instance_uid=sop_instance if len(sop_instance) <= 64 else None)
        return exc.status

    relpath = spool_relpath(meta.sop_instance_uid)
    try:
        header = encode_file_meta(meta.sop_class_uid, meta.sop_instance_uid, transfer_syntax, calling_ae)
        tmp, size = ctx.spool.write_temp(header, body)
    except OSError as exc:
        return _failed(ctx, STATUS_OUT_OF_RESOURCES, "spool write failed", exc, peer, meta.sop_instance_uid)

    rec = ReceivedInstance(
        sop_instance_uid=meta.sop_instance_uid, sop_class_uid=meta.sop_class_uid,
        study_instance_uid=meta.study_instance_uid, series_instance_uid=meta.series_instance_uid,
        transfer_syntax_uid=transfer_syntax, file_path=relpath, file_size=size, calling_ae=calling_ae or None,
        modality=meta.modality, body_part=meta.body_part, patient_id=meta.patient_id,
        accession_number=meta.accession_number, study_date=meta.study_date,
        requested_priority=meta.requested_priority,
        study_fields=meta.study_fields(),
    )
    try:
        instance_id, created = record_received(ctx.sessions, rec, lambda: ctx.spool.commit(tmp, relpath))
    except OSError as exc:
        return _failed(ctx, STATUS_OUT_OF_RESOURCES, "spool commit failed", exc, peer, meta.sop_instance_uid)
    except Exception as exc:  # noqa: BLE001 - any database trouble means "not stored"
        return _failed(ctx, STATUS_OUT_OF_RESOURCES_DB, "database write failed", exc, peer, meta.sop_instance_uid)
    finally:
        ctx.spool.discard(tmp)  # no-op once committed

    elapsed_ms = (time.perf_counter() - started) * 1000
    if created and ctx.notifier is not None:
        ctx.notifier.notify()
    if created:
        log.info("stored %s instance %s (%.1f MB, %s) from %s in %.0f ms", meta.modality or "?", relpath[6:18],
                 size / 1e6, UID(transfer_syntax).name, peer, elapsed_ms, extra={"instance": relpath[6:18]})
    else:
        log.info("duplicate instance %s from %s acknowledged (already stored)", relpath[6:18], peer,
                 extra={"instance": relpath[6:18]})
    return 0x0000


def _refused(status: int, reason: str) -> Dataset:
    """A failure status with its reason in Error Comment (0000,0902), which storescu and most PACS log."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = reason[:64]
    return rsp


def _failed(ctx: StoreContext, status: int, what: str, exc: Exception, peer: str, sop_instance_uid: str) -> int:
    log.error("C-STORE from %s failed, answering 0x%04X: %s: %s: %s", peer, status, what, type(exc).__name__, exc,
              extra={"instance": spool_relpath(sop_instance_uid)[6:18]})
    record_event(ctx.sessions, "store_failed", f"status 0x{status:04X}: {what}: {type(exc).__name__}: {exc}"[:2000],
                 level="error", peer=peer, sop_instance_uid=sop_instance_uid)
    return status


def bind_association(event: DicomEvent) -> None:
    """Tag this association thread's log lines (log_format = "json") with a short association id, the
    calling AE and the peer."""
    assoc = event.assoc
    logs.bind(association=compat.log_id(assoc), calling_ae=(assoc.requestor.ae_title or "").strip(),
              peer=f"{assoc.requestor.address}:{assoc.requestor.port}")


def handle_accepted(event: DicomEvent) -> None:
    bind_association(event)
    log.info("association from %s accepted", peer_of(event))


def rejection_reason(assoc, allowed: tuple[str, ...], check_called_ae: bool) -> str:  # noqa: ANN001
    """Why pynetdicom (or fast_transport.BoundedACSE) rejected ``assoc``, in the order pynetdicom decides
    (a later check overrides an earlier one): limits, then called AE title, then calling AE title."""
    own = compat.reject_reason(assoc)
    if own:
        return own
    acceptors = [a for a in assoc.ae.active_associations if a.is_acceptor]
    if len(acceptors) > assoc.ae.maximum_associations:
        return f"too many associations (max_associations = {assoc.ae.maximum_associations})"
    primitive = assoc.requestor.primitive
    called = (getattr(primitive, "called_ae_title", None) or "").strip()
    ours = (assoc.acceptor.ae_title or "").strip()
    if check_called_ae and called != ours:
        return f"called AE title {called!r} is not ours ({ours!r})"
    calling = (assoc.requestor.ae_title or "").strip()
    if allowed and calling not in allowed:
        return "calling AE title not in allowed_calling_aes"
    return "rejected"


def handle_rejected(event: DicomEvent, sessions: sessionmaker[Session], allowed: tuple[str, ...],
                    check_called_ae: bool = True) -> None:
    """Log and record every rejected association with the peer's address."""
    peer = peer_of(event)
    reason = rejection_reason(event.assoc, allowed, check_called_ae)
    rq = event.assoc.requestor
    log.warning("association from %s rejected: %s", peer, reason,
                extra={"calling_ae": (rq.ae_title or "").strip(), "peer": f"{rq.address}:{rq.port}"})
    record_event(sessions, "association_rejected", reason, level="warning", peer=peer)


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
