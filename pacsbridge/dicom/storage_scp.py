"""Storage SCP: accepts C-ECHO and C-STORE of chest radiographs and stores them durably.

An instance gets status 0x0000 only after its file is fsync'd under its final (hashed) name, the
folder is fsync'd and its rows are committed.  Anything else gets a failure status and an Event.
Handlers are plain functions; their dependencies arrive as bound pynetdicom handler arguments.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import FileMetaDataset
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
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge import __version__
from pacsbridge.dicom.fast_transport import FastRequestHandler
from pacsbridge.dicom.metadata import (
    STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES_DB, RejectedDataset, read_metadata,
)
from pacsbridge.dicom.ups_scp import UpsContext, add_ups_contexts, ups_handlers
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
    our_ae_title: str
    notifier: StoreNotifier | None = None  # told after each new instance is committed (wakes the worker)


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


def handle_store(event: DicomEvent, ctx: StoreContext) -> int:
    """Store one instance durably, then (and only then) answer success."""
    started = time.perf_counter()
    req = event.request
    peer = peer_of(event)
    calling_ae = (event.assoc.requestor.ae_title or "").strip()
    sop_class = str(req.AffectedSOPClassUID or "")
    sop_instance = str(req.AffectedSOPInstanceUID or "")
    transfer_syntax = str(event.context.transfer_syntax)
    body = req.DataSet.getvalue() if req.DataSet is not None else b""

    try:
        meta = read_metadata(body, transfer_syntax, sop_class, sop_instance)
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
                 size / 1e6, UID(transfer_syntax).name, peer, elapsed_ms)
    else:
        log.info("duplicate instance %s from %s acknowledged (already stored)", relpath[6:18], peer)
    return 0x0000


def _failed(ctx: StoreContext, status: int, what: str, exc: Exception, peer: str, sop_instance_uid: str) -> int:
    log.error("C-STORE from %s failed, answering 0x%04X: %s: %s: %s", peer, status, what, type(exc).__name__, exc)
    record_event(ctx.sessions, "store_failed", f"status 0x{status:04X}: {what}: {type(exc).__name__}: {exc}"[:2000],
                 level="error", peer=peer, sop_instance_uid=sop_instance_uid)
    return status


def handle_accepted(event: DicomEvent) -> None:
    log.info("association from %s accepted", peer_of(event))


def handle_rejected(event: DicomEvent, sessions: sessionmaker[Session], allowed: tuple[str, ...]) -> None:
    """Log and record every rejected association with the peer's address."""
    peer = peer_of(event)
    calling_ae = (event.assoc.requestor.ae_title or "").strip()
    reason = "calling AE title not in allowed_calling_aes" if allowed and calling_ae not in allowed else "rejected"
    log.warning("association from %s rejected: %s", peer, reason)
    record_event(sessions, "association_rejected", reason, level="warning", peer=peer)


class StorageSCP:
    """The DICOM listener as a daemon component: ``start()``, ``stop()``, ``healthy()``."""

    name = "storage-scp"

    def __init__(
        self, *, ae_title: str, bind_address: str, port: int, spool: Spool, sessions: sessionmaker[Session],
        allowed_calling_aes: list[str] | tuple[str, ...] = (), max_pdu: int = 4_194_304,
        max_associations: int = 16, dimse_timeout: float = 60.0, network_timeout: float = 60.0,
        stop_timeout: float = 60.0, notifier: StoreNotifier | None = None, ups: UpsContext | None = None,
    ) -> None:
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
        self.ups = ups  # DICOM UPS pull of the worklist on the same AE (None: not offered)
        self._server: ThreadedAssociationServer | None = None

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION
        ae.maximum_pdu_size = self.max_pdu
        ae.maximum_associations = self.max_associations
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.acse_timeout = 30
        ae.require_calling_aet = list(self.allowed)
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        if self.ups is not None:
            add_ups_contexts(ae)
        return ae

    def start(self) -> None:
        ctx = StoreContext(spool=self.spool, sessions=self.sessions, our_ae_title=self.ae_title,
                           notifier=self.notifier)
        handlers = [
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [ctx]),
            (evt.EVT_ACCEPTED, handle_accepted),
            (evt.EVT_REJECTED, handle_rejected, [self.sessions, self.allowed]),
        ]
        if self.ups is not None:
            handlers += ups_handlers(self.ups)
        # start_server(block=False), but with our faster socket via pynetdicom's server hooks.
        ae = self._make_ae()
        server = ae.make_server((self.bind_address, self.requested_port), evt_handlers=handlers,
                                server_class=ThreadedAssociationServer, request_handler=FastRequestHandler)
        threading.Thread(target=server.serve_forever, name=f"{self.name}-listener", daemon=True).start()
        ae._servers.append(server)  # as start_server does, so ae.shutdown() would see it
        self._server = server
        log.info("DICOM Storage SCP %s listening on %s:%d (max PDU %d bytes)", self.ae_title, self.bind_address,
                 self.port, self.max_pdu)

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        if self._server is None:
            return self.requested_port
        return int(self._server.server_address[1])

    def healthy(self) -> bool:
        return self._server is not None and self._server.socket.fileno() != -1

    def stop(self) -> None:
        """Stop accepting associations, then let the in-flight ones finish (up to ``stop_timeout``)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # closes the listening socket; running associations keep going
        deadline = time.monotonic() + self.stop_timeout
        active = server.active_associations
        if active:
            log.info("waiting for %d association(s) to finish", len(active))
        while active and time.monotonic() < deadline:
            for assoc in active:
                if not assoc.is_established:
                    _end_idle(assoc)
            time.sleep(0.05)
            active = [a for a in active if a.is_alive() and a.is_established]
        for assoc in active:
            log.warning("association with %s still running after %.0f s; aborting it",
                        f"{assoc.requestor.ae_title}@{assoc.requestor.address}", self.stop_timeout)
            assoc.abort()
        log.info("DICOM Storage SCP stopped")


def _end_idle(assoc) -> None:  # noqa: ANN001 - pynetdicom Association
    """End an association thread that has nothing in flight (released, or a connection that never sent an
    A-ASSOCIATE-RQ, e.g. a port probe) instead of waiting out pynetdicom's ACSE/ARTIM timers."""
    sock = getattr(assoc.dul, "socket", None)
    if sock is not None and sock.socket is not None:
        sock.close()  # Evt17: the DUL state machine goes idle
    assoc.dul.to_user_queue.put(None)  # wakes an acceptor still waiting for its A-ASSOCIATE-RQ


def storage_scp_from_settings(  # noqa: ANN001 - settings: pacsbridge.config.Settings
    settings, sessions: sessionmaker[Session], spool: Spool | None = None, notifier: StoreNotifier | None = None,
) -> StorageSCP:
    return StorageSCP(
        ae_title=settings.ae_title, bind_address=settings.bind_address, port=settings.dicom_port,
        spool=spool or Spool(Path(settings.spool_dir), fsync=settings.fsync), sessions=sessions,
        allowed_calling_aes=settings.allowed_calling_aes, max_pdu=settings.max_pdu,
        max_associations=settings.max_associations, dimse_timeout=settings.dimse_timeout,
        network_timeout=settings.network_timeout, notifier=notifier, ups=ups_context_from_settings(settings, sessions),
    )


def ups_context_from_settings(settings, sessions: sessionmaker[Session]) -> UpsContext | None:  # noqa: ANN001
    """The UPS pull context (same claim timeout as the HTTP API), or None when ``ups_enabled`` is off."""
    if not getattr(settings, "ups_enabled", True):
        return None
    return UpsContext(sessions=sessions, claim_timeout_s=settings.claim_timeout_minutes * 60.0)
