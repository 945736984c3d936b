"""The DICOM sender: C-STOREs SRs, heatmap SCs and original images over ONE association per batch.

Each outcome is reported as soon as the peer answered, so an acknowledgement is recorded before
the next object goes out.  Association rejected, 0xA9xx, 0xCxxx, 0x0122 (SOP class not supported),
0x0124 (not authorised) are permanent; connection refused/reset, timeouts, aborts, no answer,
0xA7xx and other failures are transient.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..config import Destination
from .outbox import DueEntry
from .results import Result
from .sending import PERMANENT, SENT, TRANSIENT, ForwardContext, Outcome, PermanentError, Report

log = logging.getLogger("pacsbridge.forward.senders")  # the name operators filter on

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
ComprehensiveSRStorage = "1.2.840.10008.5.1.4.1.1.88.33"
SecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7"


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
        return SENT
    if (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000 or status in (0x0122, 0x0124):
        return PERMANENT
    return TRANSIENT  # 0xA7xx out of resources, 0x0110 processing failure, anything unexpected


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
        items = self._plan_all(entries, report)
        if not items:
            return
        assoc = self._associate(destination, items, report)
        if assoc is None:
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

    def _plan_all(self, entries: list[DueEntry], report: Report) -> list[_Item]:
        """The plans of the entries whose source can be read; the others are reported dead."""
        items: list[_Item] = []
        for entry in entries:
            try:
                items.append(self.plan(entry))
            except PermanentError as exc:
                report(Outcome(entry.id, PERMANENT, str(exc)))
            except Exception as exc:  # noqa: BLE001 - a broken source must not stop the others
                log.exception("outbox %d: cannot read the source of %s", entry.id, entry.object)
                report(Outcome(entry.id, PERMANENT, f"cannot read the source: {type(exc).__name__}: {exc}"))
        return items

    def _associate(self, destination: Destination, items: list[_Item], report: Report) -> Any:  # noqa: ANN401
        """An established association for ``items``, or None after reporting every item's outcome."""
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ctx.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout_s
        ae.connection_timeout = destination.timeout_s
        for sop_class, syntaxes in _contexts(items):
            ae.add_requested_context(sop_class, syntaxes)
        rejection: list[str] = []

        def on_acse_recv(event: Any) -> None:  # noqa: ANN401
            p = event.primitive
            if getattr(p, "result", None) in (0x01, 0x02):
                rejection.append(f"association rejected by {destination.ae_title}: {p.result_str}, "
                                 f"{p.source_str}: {p.reason_str}")

        try:
            tls_args = self._tls_args(destination)
        except (OSError, ValueError) as exc:  # unreadable certificate/key: a configuration problem
            _report_all(items, report, PERMANENT, f"TLS configuration: {exc}")
            return None
        try:
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                                 max_pdu=0, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse_recv)], tls_args=tls_args)
        except Exception as exc:  # noqa: BLE001 - e.g. a name that does not resolve
            _report_all(items, report, TRANSIENT, f"cannot connect: {type(exc).__name__}: {exc}")
            return None
        if not assoc.is_established:
            _report_all(items, report, *_not_established(assoc, destination, rejection))
            return None
        return assoc

    def _store_all(self, assoc: Any, futures: list[tuple[int, Future]], destination: Destination,
                   report: Report) -> None:
        # An accepted context carries the one transfer syntax the peer chose (as a one-item list).
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        for n, (entry_id, future) in enumerate(futures):
            try:
                it = future.result()
            except PermanentError as exc:
                report(Outcome(entry_id, PERMANENT, str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a broken source must not stop the others
                log.exception("outbox %d: could not build the object", entry_id)
                report(Outcome(entry_id, PERMANENT, f"could not build the object: {type(exc).__name__}: {exc}"))
                continue
            if not assoc.is_established:
                for rest_id, _ in futures[n:]:
                    report(Outcome(rest_id, TRANSIENT, "association ended before it was sent"))
                return
            payload = it.payload
            if (it.sop_class, it.transfer_syntax) not in accepted:
                if isinstance(payload, Path) and it.transfer_syntax in UNCOMPRESSED and any(
                        (it.sop_class, str(ts)) in accepted for ts in UNCOMPRESSED):
                    payload = dcmread(payload)  # uncompressed: pynetdicom converts the encoding only
                elif isinstance(payload, Path) or not any(a == it.sop_class for a, _ in accepted):
                    report(Outcome(it.entry.id, PERMANENT,
                                   f"{destination.name} accepts no presentation context for SOP class "
                                   f"{it.sop_class} in transfer syntax {it.transfer_syntax} "
                                   "(originals are never re-encoded)", it.sop_instance))
                    continue
            try:
                status = assoc.send_c_store(payload)
            except Exception as exc:  # noqa: BLE001 - connection reset, encoding trouble
                report(Outcome(it.entry.id, TRANSIENT, f"C-STORE failed: {type(exc).__name__}: {exc}",
                               it.sop_instance))
                continue
            if "Status" not in status:
                report(Outcome(it.entry.id, TRANSIENT,
                               "no C-STORE response (timed out, aborted or invalid)", it.sop_instance))
                continue
            code = int(status.Status)
            state = _classify_status(code)
            detail = f"C-STORE status 0x{code:04X}"
            comment = status.get("ErrorComment")
            if comment:
                detail += f" ({comment})"
            report(Outcome(it.entry.id, state, detail if state != SENT or code else "", it.sop_instance))


def _report_all(items: list[_Item], report: Report, state: str, why: str) -> None:
    for it in items:
        report(Outcome(it.entry.id, state, why))


def _not_established(assoc: Any, destination: Destination, rejection: list[str]) -> tuple[str, str]:  # noqa: ANN401
    """(state, why) for an association that did not come up."""
    if assoc.is_rejected:
        return PERMANENT, rejection[0] if rejection else "association rejected"
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        # The peer answered but supports none of what we would send (e.g. no SR storage).
        refused = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        return PERMANENT, f"{destination.ae_title} accepted none of the presentation contexts {refused}"
    return TRANSIENT, (f"cannot connect to {destination.host}:{destination.port} or no "
                         "association (refused, timed out or aborted)")


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
