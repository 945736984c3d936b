"""The C-STORE handler: one received instance, stored durably before it is acknowledged.

An instance gets status 0x0000 only after its file is fsync'd under its final (hashed) name, the
folder is fsync'd and its rows are committed.  Anything else gets a failure status and an Event.
Handlers are plain functions; their dependencies arrive as bound pynetdicom handler arguments.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.events import Event as DicomEvent
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge import __version__
from pacsbridge.dicom import compat
from pacsbridge.dicom.metadata import (
    DEFAULT_MAX_INFLATED_BYTES, STATUS_DATASET_TOO_LARGE, STATUS_OUT_OF_RESOURCES, STATUS_OUT_OF_RESOURCES_DB,
    InstanceMeta, RejectedDataset, read_metadata,
)
from pacsbridge.dicom.peer_policy import bind_association, peer_of
from pacsbridge.store.diskguard import DiskGuard
from pacsbridge.store.notifier import StoreNotifier
from pacsbridge.store.records import ReceivedInstance, record_event, record_received
from pacsbridge.store.spool import Spool, spool_relpath

log = logging.getLogger("pacsbridge.dicom.storage_scp")  # the name operators filter on

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
    sop_instance = str(req.AffectedSOPInstanceUID or "")
    transfer_syntax = str(event.context.transfer_syntax)
    if not compat.has_log_id(event.assoc):
        bind_association(event)
    refusal = _disk_refusal(ctx, peer)
    if refusal is not None:
        return refusal
    try:
        body, meta = _read_dataset(req, transfer_syntax, sop_instance, ctx.max_inflated_bytes)
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

    rec = _received(meta, transfer_syntax, relpath, size, calling_ae)
    try:
        _, created = record_received(ctx.sessions, rec, lambda: ctx.spool.commit(tmp, relpath))
    except OSError as exc:
        return _failed(ctx, STATUS_OUT_OF_RESOURCES, "spool commit failed", exc, peer, meta.sop_instance_uid)
    except Exception as exc:  # noqa: BLE001 - any database trouble means "not stored"
        return _failed(ctx, STATUS_OUT_OF_RESOURCES_DB, "database write failed", exc, peer, meta.sop_instance_uid)
    finally:
        ctx.spool.discard(tmp)  # no-op once committed

    elapsed_ms = (time.perf_counter() - started) * 1000
    if created and ctx.notifier is not None:
        ctx.notifier.notify()
    _log_stored(created, meta, relpath, size, transfer_syntax, peer, elapsed_ms)
    return 0x0000


def _disk_refusal(ctx: StoreContext, peer: str) -> Dataset | None:
    """The refusal when the spool is below its free-space floor, checked before parsing or writing anything."""
    if ctx.disk_guard is None:
        return None
    low = ctx.disk_guard.check()  # logged once by the guard
    if low is None:
        return None
    ctx.disk_guard.refuse()
    log.debug("refused C-STORE from %s: 0x%04X, %s", peer, STATUS_OUT_OF_RESOURCES, low)
    return _refused(STATUS_OUT_OF_RESOURCES, low)


def _read_dataset(req, transfer_syntax: str, sop_instance: str,  # noqa: ANN001 - a pynetdicom C-STORE request
                  max_inflated: int) -> tuple[bytes, InstanceMeta]:
    """The received bytes and what they say; raises :class:`RejectedDataset` for what cannot be stored."""
    if getattr(req.DataSet, "overflowed", False):  # fast_transport.CappedBuffer dropped it past the cap
        raise RejectedDataset(STATUS_DATASET_TOO_LARGE, f"data set of {req.DataSet.received} bytes exceeds "
                              f"max_dataset_bytes ({req.DataSet.cap})")
    body = req.DataSet.getvalue() if req.DataSet is not None else b""
    sop_class = str(req.AffectedSOPClassUID or "")
    return body, read_metadata(body, transfer_syntax, sop_class, sop_instance, max_inflated=max_inflated)


def _received(meta: InstanceMeta, transfer_syntax: str, relpath: str, size: int,
              calling_ae: str) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=meta.sop_instance_uid, sop_class_uid=meta.sop_class_uid,
        study_instance_uid=meta.study_instance_uid, series_instance_uid=meta.series_instance_uid,
        transfer_syntax_uid=transfer_syntax, file_path=relpath, file_size=size, calling_ae=calling_ae or None,
        modality=meta.modality, body_part=meta.body_part, patient_id=meta.patient_id,
        accession_number=meta.accession_number, study_date=meta.study_date,
        requested_priority=meta.requested_priority,
        study_fields=meta.study_fields(),
    )


def _log_stored(created: bool, meta: InstanceMeta, relpath: str, size: int, transfer_syntax: str, peer: str,
                elapsed_ms: float) -> None:
    short = relpath[6:18]  # a hash of the UID, not the UID (no identifiers at INFO)
    if created:
        log.info("stored %s instance %s (%.1f MB, %s) from %s in %.0f ms", meta.modality or "?", short,
                 size / 1e6, UID(transfer_syntax).name, peer, elapsed_ms, extra={"instance": short})
    else:
        log.info("duplicate instance %s from %s acknowledged (already stored)", short, peer,
                 extra={"instance": short})


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
