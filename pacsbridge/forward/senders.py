"""Senders: deliver built objects to one destination and say, per outbox entry, what happened.

A sender gets a batch of due entries for one destination and sends them over ONE association
(DICOM) or ONE connection (HL7), reporting each outcome as soon as the peer answered, so an
acknowledgement is recorded before the next object goes out.  Outcomes are ``sent``, ``transient``
(retry later) or ``permanent`` (dead).  :data:`SENDERS` is the registry of destination kinds.

DICOM classification: association rejected, 0xA9xx, 0xCxxx, 0x0122 (SOP class not supported),
0x0124 (not authorised) are permanent; connection refused/reset, timeouts, aborts, no answer,
0xA7xx and other failures are transient.  HL7: ACK AA/CA sent, AE/CE transient, AR/CR permanent;
no ACK within the timeout is transient.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..config import Destination
from ..imaging.limits import DEFAULT_MAX_DECODED_BYTES
from ..store.spool import OutsideSpool, contained_path
from .outbox import DueEntry
from .results import Result

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
ComprehensiveSRStorage = "1.2.840.10008.5.1.4.1.1.88.33"
SecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class Outcome:
    entry_id: int
    state: str  # "sent" | "transient" | "permanent"
    detail: str = ""
    object_uid: str | None = None


Report = Callable[[Outcome], None]


class Sender(Protocol):
    def send(self, destination: Destination, entries: list[DueEntry], report: Report) -> None: ...


class PermanentError(Exception):
    """The object can never be built or sent as configured (dead at once)."""


@dataclass
class ForwardContext:
    """What senders need from the daemon: our AE title, the spool, and (for heatmaps) the model."""

    ae_title: str
    spool_dir: Path
    load_model: Callable[[], Any] | None = None  # -> LoadedModel, called once on the first heatmap
    # For destinations with tls = true: the lowest version offered, and the CA bundle and client
    # certificate used where a destination names none of its own (dicom_tls_ca, dicom_tls_client_*).
    tls_min_version: str = "1.2"
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    #: Heatmaps decode the source within this (the worker's max_decoded_bytes).
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    _model: Any = field(default=None, repr=False)

    def source_path(self, result: Result) -> Path:
        if result.spool_deleted:
            raise PermanentError("the source image was deleted by retention")
        try:
            path = contained_path(self.spool_dir, result.file_path)
        except OutsideSpool:
            path = None
        if path is None or not path.is_file():
            raise PermanentError("the source image is missing from the spool")
        return path

    def model(self) -> Any:
        if self._model is None:
            if self.load_model is None:
                raise PermanentError("no model is configured for heatmaps")
            self._model = self.load_model()
        return self._model


# -- DICOM ---------------------------------------------------------------------------------------
@dataclass
class _Item:
    entry: DueEntry
    payload: Dataset | Path  # a built object, or the spooled original (sent byte for byte)
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    source: Path | None = None  # the spooled source image

    def __post_init__(self) -> None:
        if self.source is None and isinstance(self.payload, Path):
            self.source = self.payload


def _classify_status(status: int) -> str:
    if status in (0x0000, 0xB000, 0xB006, 0xB007):
        return "sent"
    if (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000 or status in (0x0122, 0x0124):
        return "permanent"
    return "transient"  # 0xA7xx out of resources, 0x0110 processing failure, anything unexpected


class DicomSender:
    """C-STOREs SRs, heatmap SCs and original images to a DICOM peer (pynetdicom SCU)."""

    kind = "dicom"

    def __init__(self, ctx: ForwardContext) -> None:
        from pacsbridge.dicom.compat import configure_pynetdicom

        configure_pynetdicom()  # once per process: an original file is sent as its bytes, never re-encoded
        self.ctx = ctx

    # planning and building ---------------------------------------------------------------------
    def plan(self, entry: DueEntry) -> _Item:
        """What will be sent for ``entry`` (SOP class, transfer syntax), without building it yet:
        enough to negotiate the association, so an unreachable peer costs no building."""
        r = entry.result
        path = self.ctx.source_path(r)
        if entry.object == "images":
            meta = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).file_meta
            return _Item(entry, path, r.sop_class_uid, r.sop_instance_uid, str(meta.TransferSyntaxUID))
        if entry.object == "sr":
            return _Item(entry, path, ComprehensiveSRStorage, r.derived_uid("sr"), ExplicitVRLittleEndian)
        if entry.object == "heatmap":
            return _Item(entry, path, SecondaryCaptureImageStorage, r.derived_uid("heatmap"), ExplicitVRLittleEndian)
        raise PermanentError(f"unknown object kind {entry.object!r} for a DICOM destination")

    def build(self, item: _Item) -> _Item:
        """The item with its object built (an original stays a path: its bytes are sent as they are)."""
        r, path = item.entry.result, item.source
        if item.entry.object == "sr":
            from .sr import build_sr

            ds = build_sr(r, dcmread(path, stop_before_pixels=True), ae_title=self.ctx.ae_title)
        elif item.entry.object == "heatmap":
            ds = self._heatmap(r, path)
        else:
            return item
        return _Item(item.entry, ds, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                     str(ds.file_meta.TransferSyntaxUID), source=path)

    def _heatmap(self, r: Result, path: Path) -> Dataset:
        from ..imaging import NotAnalysable, load_for_model
        from .heatmap_sc import HeatmapUnavailable, build_heatmap_sc, heatmap_overlay

        model = self.ctx.model()
        if getattr(model, "weights_sha256", r.weights_sha256) != r.weights_sha256:
            raise PermanentError("the model that scored this image is no longer the configured model")
        try:
            # enough detail for a heatmap view, through the same size guard as the worker
            image = load_for_model(path, min_side=512, max_decoded_bytes=self.ctx.max_decoded_bytes).image
            label = f"AI: pneumonia {'POSITIVE' if r.positive else 'negative'}, p={r.probability:.2f} ({r.model_id})"
            overlay = heatmap_overlay(model, image, label)
        except (HeatmapUnavailable, NotAnalysable) as exc:
            raise PermanentError(str(exc)) from None
        return build_heatmap_sc(r, dcmread(path, stop_before_pixels=True), overlay)  # header values only

    # sending -----------------------------------------------------------------------------------
    def _tls_args(self, destination: Destination) -> tuple[Any, str] | None:
        """pynetdicom's ``tls_args`` for a destination with ``tls = true`` (None: plain TCP)."""
        if not destination.tls:
            return None
        from pacsbridge.dicom.tls import make_client_context

        own_cert = destination.tls_cert_file is not None
        ctx = make_client_context(
            ca=str(destination.tls_ca_file or self.ctx.tls_ca),
            cert=str(destination.tls_cert_file) if own_cert else self.ctx.tls_client_cert,
            key=str(destination.tls_key_file) if own_cert else self.ctx.tls_client_key,
            min_version=self.ctx.tls_min_version, check_hostname=destination.tls_check_hostname,
        )
        return ctx, destination.host

    def send(self, destination: Destination, entries: list[DueEntry], report: Report) -> None:
        from pynetdicom import AE, evt

        items: list[_Item] = []
        for entry in entries:
            try:
                items.append(self.plan(entry))
            except PermanentError as exc:
                report(Outcome(entry.id, "permanent", str(exc)))
            except Exception as exc:  # noqa: BLE001 - a broken source must not stop the others
                log.exception("outbox %d: cannot read the source of %s", entry.id, entry.object)
                report(Outcome(entry.id, "permanent", f"cannot read the source: {type(exc).__name__}: {exc}"))
        if not items:
            return
        ae = AE(ae_title=self.ctx.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
        ae.connection_timeout = destination.timeout_s
        for sop_class, syntaxes in _contexts(items):
            ae.add_requested_context(sop_class, syntaxes)
        rejection: list[str] = []

        def on_acse_recv(event: Any) -> None:
            p = event.primitive
            if getattr(p, "result", None) in (0x01, 0x02):
                rejection.append(f"association rejected by {destination.ae_title}: {p.result_str}, "
                                 f"{p.source_str}: {p.reason_str}")

        try:
            tls_args = self._tls_args(destination)
        except (OSError, ValueError) as exc:  # unreadable certificate/key: a configuration problem
            for it in items:
                report(Outcome(it.entry.id, "permanent", f"TLS configuration: {exc}"))
            return
        try:
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                 max_pdu=0, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse_recv)], tls_args=tls_args)
        except Exception as exc:  # noqa: BLE001 - e.g. a name that does not resolve
            for it in items:
                report(Outcome(it.entry.id, "transient", f"cannot connect: {type(exc).__name__}: {exc}"))
            return
        if not assoc.is_established:
            if assoc.is_rejected:
                state, why = "permanent", rejection[0] if rejection else "association rejected"
            elif assoc.rejected_contexts and not assoc.accepted_contexts:
                # The peer answered but supports none of what we would send (e.g. no SR storage).
                refused = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
                state, why = "permanent", f"{destination.ae_title} accepted none of the presentation contexts {refused}"
            else:
                state, why = "transient", (f"cannot connect to {destination.host}:{destination.port} or no "
                                           "association (refused, timed out or aborted)")
            for it in items:
                report(Outcome(it.entry.id, state, why))
            return
        # Build in a second thread while the association sends: the next SR is made while the peer
        # stores the previous one (building is CPU in this process, storing is the peer's work).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward-build") as builder:
            futures = [(it.entry.id, builder.submit(self.build, it)) for it in items]
            try:
                self._store_all(assoc, futures, destination, report)
            finally:
                for _, f in futures:
                    f.cancel()
                if assoc.is_established:
                    assoc.release()

    def _store_all(self, assoc: Any, futures: list[tuple[int, Future]], destination: Destination,
                   report: Report) -> None:
        # An accepted context carries the one transfer syntax the peer chose (as a one-item list).
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        for n, (entry_id, future) in enumerate(futures):
            try:
                it = future.result()
            except PermanentError as exc:
                report(Outcome(entry_id, "permanent", str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a broken source must not stop the others
                log.exception("outbox %d: could not build the object", entry_id)
                report(Outcome(entry_id, "permanent", f"could not build the object: {type(exc).__name__}: {exc}"))
                continue
            if not assoc.is_established:
                for rest_id, _ in futures[n:]:
                    report(Outcome(rest_id, "transient", "association ended before it was sent"))
                return
            payload = it.payload
            if (it.sop_class, it.transfer_syntax) not in accepted:
                if isinstance(payload, Path) and it.transfer_syntax in UNCOMPRESSED and any(
                        (it.sop_class, str(ts)) in accepted for ts in UNCOMPRESSED):
                    payload = dcmread(payload)  # uncompressed: pynetdicom converts the encoding only
                elif isinstance(payload, Path) or not any(a == it.sop_class for a, _ in accepted):
                    report(Outcome(it.entry.id, "permanent",
                                   f"{destination.name} accepts no presentation context for SOP class "
                                   f"{it.sop_class} in transfer syntax {it.transfer_syntax} "
                                   "(originals are never re-encoded)", it.sop_instance))
                    continue
            try:
                status = assoc.send_c_store(payload)
            except Exception as exc:  # noqa: BLE001 - connection reset, encoding trouble
                report(Outcome(it.entry.id, "transient", f"C-STORE failed: {type(exc).__name__}: {exc}",
                               it.sop_instance))
                continue
            if "Status" not in status:
                report(Outcome(it.entry.id, "transient",
                               "no C-STORE response (timed out, aborted or invalid)", it.sop_instance))
                continue
            code = int(status.Status)
            state = _classify_status(code)
            detail = f"C-STORE status 0x{code:04X}"
            comment = status.get("ErrorComment")
            if comment:
                detail += f" ({comment})"
            report(Outcome(it.entry.id, state, detail if state != "sent" or code else "", it.sop_instance))


def _contexts(items: list[_Item]) -> list[tuple[str, list[str]]]:
    """Presentation contexts for a batch: built objects in explicit/implicit little endian; an original
    in its own transfer syntax first (a context of its own, so the peer cannot choose another for
    it) and, when it is uncompressed, the uncompressed alternatives in a second context."""
    out: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def add(sop: str, syntaxes: list[str]) -> None:
        key = (sop, tuple(syntaxes))
        if key not in seen:
            seen.add(key)
            out.append((sop, syntaxes))

    for it in items:
        if it.entry.object == "images":
            add(it.sop_class, [it.transfer_syntax])
            if it.transfer_syntax in UNCOMPRESSED:
                add(it.sop_class, [str(ts) for ts in UNCOMPRESSED if ts != it.transfer_syntax])
        else:
            add(it.sop_class, [str(ts) for ts in UNCOMPRESSED])
    if len(out) > 128:
        raise PermanentError("too many presentation contexts for one association")
    return out


# -- HL7 -----------------------------------------------------------------------------------------
class Hl7Sender:
    """Sends ORU^R01 messages over MLLP (python-hl7's asyncio MLLP streams) and checks each ACK."""

    kind = "hl7"

    def __init__(self, ctx: ForwardContext) -> None:
        self.ctx = ctx

    def build(self, destination: Destination, entry: DueEntry) -> tuple[str, Any]:
        from .header_values import header_values
        from .hl7_oru import build_oru

        r = entry.result
        try:
            source = dcmread(self.ctx.source_path(r), stop_before_pixels=True)
        except PermanentError:
            source = None  # the RIS still gets the result, without demographics
        values = header_values(source)
        for note in values.notes:
            log.info("ORU for prediction %d: %s", r.prediction_id, note)
        control_id = r.message_control_id(destination.name)
        msg = build_oru(r, values, control_id=control_id, sending_application=destination.sending_application,
                        sending_facility=destination.sending_facility,
                        receiving_application=destination.receiving_application,
                        receiving_facility=destination.receiving_facility, charset=destination.hl7_encoding)
        return control_id, msg

    def send(self, destination: Destination, entries: list[DueEntry], report: Report) -> None:
        messages = []
        for entry in entries:
            try:
                messages.append((entry, *self.build(destination, entry)))
            except Exception as exc:  # noqa: BLE001
                log.exception("outbox %d: could not build the ORU", entry.id)
                report(Outcome(entry.id, "permanent", f"could not build the ORU: {type(exc).__name__}: {exc}"))
        if messages:
            asyncio.run(self._send(destination, messages, report))

    async def _send(self, destination: Destination, messages: list, report: Report) -> None:
        from hl7.mllp import open_hl7_connection

        from .hl7_oru import wire_encoding

        timeout = destination.timeout_s
        try:
            reader, writer = await asyncio.wait_for(  # bytes on the wire in the encoding MSH-18 names
                open_hl7_connection(destination.host, destination.port,
                                    encoding=wire_encoding(destination.hl7_encoding)), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            why = f"cannot connect to {destination.host}:{destination.port}: {type(exc).__name__}: {exc}"
            for entry, control_id, _ in messages:
                report(Outcome(entry.id, "transient", why, control_id))
            return
        try:
            for n, (entry, control_id, msg) in enumerate(messages):
                try:
                    writer.writemessage(msg)
                    await asyncio.wait_for(writer.drain(), timeout)
                    ack = await asyncio.wait_for(reader.readmessage(), timeout)
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, Exception) as exc:  # noqa: BLE001
                    why = ("no ACK within %.0f s" % timeout if isinstance(exc, asyncio.TimeoutError)
                           else f"connection failed: {type(exc).__name__}: {exc}")
                    report(Outcome(entry.id, "transient", why, control_id))
                    for rest, rest_id, _ in messages[n + 1:]:
                        report(Outcome(rest.id, "transient", "not sent: the connection failed before it",
                                       rest_id))
                    return
                report(_ack_outcome(entry.id, control_id, ack))
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except Exception:  # noqa: BLE001 - closing is best effort
                pass


def _ack_outcome(entry_id: int, control_id: str, ack: Any) -> Outcome:
    try:
        msa = ack.segment("MSA")
        code, acked_id = str(msa[1]).strip().upper(), str(msa[2]).strip()
        text = str(msa[3]) if len(msa) > 3 else ""
    except (KeyError, IndexError):
        return Outcome(entry_id, "transient", "the answer has no MSA segment", control_id)
    try:
        err = str(ack.segment("ERR"))
    except KeyError:
        err = ""
    detail = f"ACK {code}" + (f": {text}" if text else "") + (f" [{err}]" if err else "")
    if acked_id != control_id:
        return Outcome(entry_id, "transient", f"ACK for message {acked_id!r}, expected {control_id!r}", control_id)
    if code in ("AA", "CA"):
        return Outcome(entry_id, "sent", "", control_id)
    if code in ("AR", "CR"):
        return Outcome(entry_id, "permanent", detail, control_id)
    return Outcome(entry_id, "transient", detail, control_id)  # AE, CE, anything else


#: Destination kinds and their senders (a new kind: a sender class here and a Literal in config).
SENDERS: dict[str, Callable[[ForwardContext], Sender]] = {"dicom": DicomSender, "hl7": Hl7Sender}
