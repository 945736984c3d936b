"""Senders: deliver built objects to one destination and say, per outbox entry, what happened.

A sender gets a batch of due entries for one destination and sends them over ONE association
(DICOM) or ONE connection (HL7), reporting each outcome as soon as the peer answered, so an
acknowledgement is recorded before the next object goes out.  Outcomes are ``sent``, ``transient``
(retry later) or ``permanent`` (dead).  :data:`SENDERS` is the registry of destination kinds.

DICOM classification: association rejected, 0xA9xx, 0xCxxx, 0x0122 (SOP class not supported),
0x0124 (not authorised) are permanent; connection refused/reset, timeouts, aborts, no answer,
0xA7xx and other failures are transient.  HL7: ACK AA/CA sent, AE/CE transient, AR/CR permanent;
no ACK within the timeout is transient.

The DICOM sender is in :mod:`.dicom_sender`, the HL7 sender in :mod:`.hl7_sender`, what they share
(outcomes, the sender protocol, the daemon's context) in :mod:`.sending`; all stay importable from here.
"""

from __future__ import annotations

from collections.abc import Callable

from .dicom_sender import DicomSender
from .hl7_sender import Hl7Sender
from .sending import ForwardContext, Outcome, PermanentError, Report, Sender

__all__ = ["SENDERS", "DicomSender", "ForwardContext", "Hl7Sender", "Outcome", "PermanentError", "Report", "Sender"]

#: Destination kinds and their senders (a new kind: a sender module beside dicom_sender.py, an entry
#: here and a Literal in config).
SENDERS: dict[str, Callable[[ForwardContext], Sender]] = {"dicom": DicomSender, "hl7": Hl7Sender}
