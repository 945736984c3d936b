"""The HL7 sender: ORU^R01 messages over ONE MLLP connection per batch, each ACK checked.

ACK AA/CA: sent; AE/CE: transient; AR/CR: permanent; no ACK within the timeout: transient (and the
rest of the batch is not sent on that connection).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydicom import dcmread

from ..config import Destination
from .outbox import DueEntry
from .sending import PERMANENT, SENT, TRANSIENT, ForwardContext, Outcome, PermanentError, Report

log = logging.getLogger("pacsbridge.forward.senders")  # the name operators filter on


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
                report(Outcome(entry.id, PERMANENT, f"could not build the ORU: {type(exc).__name__}: {exc}"))
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
                report(Outcome(entry.id, TRANSIENT, why, control_id))
            return
        try:
            for n, (entry, control_id, msg) in enumerate(messages):
                try:
                    writer.writemessage(msg)
                    await asyncio.wait_for(writer.drain(), timeout)
                    ack = await asyncio.wait_for(reader.readmessage(), timeout)
                except Exception as exc:  # noqa: BLE001 - socket errors, no ACK in time, a cut stream: retried
                    why = ("no ACK within %.0f s" % timeout if isinstance(exc, asyncio.TimeoutError)
                           else f"connection failed: {type(exc).__name__}: {exc}")
                    report(Outcome(entry.id, TRANSIENT, why, control_id))
                    for rest, rest_id, _ in messages[n + 1:]:
                        report(Outcome(rest.id, TRANSIENT, "not sent: the connection failed before it",
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
        return Outcome(entry_id, TRANSIENT, "the answer has no MSA segment", control_id)
    try:
        err = str(ack.segment("ERR"))
    except KeyError:
        err = ""
    detail = f"ACK {code}" + (f": {text}" if text else "") + (f" [{err}]" if err else "")
    if acked_id != control_id:
        return Outcome(entry_id, TRANSIENT, f"ACK for message {acked_id!r}, expected {control_id!r}", control_id)
    if code in ("AA", "CA"):
        return Outcome(entry_id, SENT, "", control_id)
    if code in ("AR", "CR"):
        return Outcome(entry_id, PERMANENT, detail, control_id)
    return Outcome(entry_id, TRANSIENT, detail, control_id)  # AE, CE, anything else
