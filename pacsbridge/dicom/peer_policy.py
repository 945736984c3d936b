"""Who is calling, and why an association was refused: the peer side of the Storage SCP.

Log lines name the peer as ``CALLING_AE@address:port`` (AE titles are not PHI); every rejected
association is logged and recorded as an Event with the reason pynetdicom (or
fast_transport.BoundedACSE) decided on.
"""

from __future__ import annotations

import logging

from pynetdicom.events import Event as DicomEvent
from sqlalchemy.orm import Session, sessionmaker

from pacsbridge import logs
from pacsbridge.dicom import compat
from pacsbridge.store.records import record_event

log = logging.getLogger("pacsbridge.dicom.storage_scp")  # the name operators filter on


def peer_of(event: DicomEvent) -> str:
    """``CALLING_AE@address:port`` of the association's requestor (AE titles are not PHI)."""
    rq = event.assoc.requestor
    return f"{(rq.ae_title or '').strip()}@{rq.address}:{rq.port}"


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
