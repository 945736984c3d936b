"""Every use of a pynetdicom internal, in one place.

The rule: outside this module, pacsbridge touches only pynetdicom's documented API (``AE``, ``evt``,
``Association`` properties and service calls, ``make_server``, ``sop_class`` ...).  Anything else, a
private name (``_config``, ``ae._servers``, ``assoc._server``, ``dul._recv_pdu``), an undocumented
attribute (``dul.socket``, ``dul.to_user_queue``, ``dul.event_queue``, ``dimse.message``), a private
method we override (``_read_pdu_data``, ``_negotiate_as_acceptor``, ``_create_association``) or an
attribute of ours kept on a pynetdicom object (``pb_*``), is reached through a function or a hook class
here.  :data:`INTERNALS` lists each one; ``tests/test_pynetdicom_compat.py`` has a canary per entry
that names the attribute when a pynetdicom release changes it, and a ``git grep`` check that none of
them is used elsewhere in ``pacsbridge/``.  pynetdicom is pinned to ``3.0.*`` (setup.cfg): on an
upgrade, run that test first.

The hook classes override pynetdicom's private methods and call a public-named method of ours
(``read_pdu``, ``negotiate_as_acceptor``, ``upgrade_association``), which the bounded transport in
:mod:`pacsbridge.dicom.fast_transport` implements.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Callable

from pynetdicom import _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import AssociationSocket, RequestHandler


@dataclass(frozen=True)
class Internal:
    """One pynetdicom internal we depend on: ``owner`` (dotted path) and ``name``, and why."""

    owner: str
    name: str
    why: str


#: Every internal this module uses (the canary test checks each against the installed pynetdicom).
INTERNALS: tuple[Internal, ...] = (
    Internal("pynetdicom._config", "STORE_SEND_CHUNKED_DATASET", "a file path is sent as its bytes"),
    Internal("pynetdicom._config", "STORE_RECV_CHUNKED_DATASET", "received data sets stay in (capped) memory"),
    Internal("pynetdicom.ae.ApplicationEntity", "_servers", "our listeners are shut down with the AE"),
    Internal("pynetdicom.association.Association", "_server", "the listener (and its limits) of an acceptor"),
    Internal("pynetdicom.dul.DULServiceProvider", "_read_pdu_data", "overridden: the bounded PDU read"),
    Internal("pynetdicom.dul.DULServiceProvider", "_decode_pdu", "decodes a PDU we read"),
    Internal("pynetdicom.dul.DULServiceProvider", "_recv_pdu", "queue of decoded PDUs for the state machine"),
    Internal("pynetdicom.dul.DULServiceProvider", "event_queue", "state machine events (Evt17, Evt19 ...)"),
    Internal("pynetdicom.dul.DULServiceProvider", "to_user_queue", "wakes an acceptor waiting for its request"),
    Internal("pynetdicom.dul.DULServiceProvider", "socket", "the association's AssociationSocket"),
    Internal("pynetdicom.dul.DULServiceProvider", "artim_timer", "the ARTIM timeout"),
    Internal("threading.Thread", "_target", "the DUL thread captured the original run_reactor"),
    Internal("pynetdicom.transport.AssociationSocket", "socket", "the raw (TCP or TLS) socket"),
    Internal("pynetdicom.dimse.DIMSEServiceProvider", "message", "the DIMSE message being received"),
    Internal("pynetdicom.dimse_messages.DIMSEMessage", "encoded_command_set", "the command set received so far"),
    Internal("pynetdicom.dimse_messages.DIMSEMessage", "data_set", "the buffer a data set is received into"),
    Internal("pynetdicom.acse.ACSE", "_negotiate_as_acceptor", "overridden: the per-peer association limit"),
    Internal("pynetdicom.transport.RequestHandler", "_create_association", "overridden: our transport classes"),
    Internal("pynetdicom.association.Association", "pb_reject_reason", "ours: why we rejected an association"),
    Internal("pynetdicom.association.Association", "pb_ups_refused", "ours: a UPS refusal was logged"),
    Internal("pynetdicom.association.Association", "pb_log_id", "ours: the association id on its log lines"),
)

#: Public-named but undocumented methods the bounded transport overrides or calls, with the parameters
#: it relies on: allowed in fast_transport.py, but each has a canary too (a rename would silently
#: bypass an override).
OVERRIDES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("pynetdicom.dul.DULServiceProvider", "run_reactor", ("self",)),
    ("pynetdicom.dul.DULServiceProvider", "kill_dul", ("self",)),
    ("pynetdicom.dimse.DIMSEServiceProvider", "receive_primitive", ("self", "primitive")),
    ("pynetdicom.transport.AssociationSocket", "recv", ("self", "nr_bytes")),
    ("pynetdicom.transport.AssociationSocket", "close", ("self",)),
    ("pynetdicom.transport.RequestHandler", "handle", ("self",)),
    ("pynetdicom.acse.ACSE", "send_reject", ("self", "result", "source", "diagnostic")),
)


# process-wide settings ---------------------------------------------------------------------------
def configure_pynetdicom() -> None:
    """Set pynetdicom's process-wide settings (the same fixed values on every call).

    Called where the daemon starts and where the parts that depend on the values are made (the DICOM
    sender, the Storage SCP's start), so that embedding code gets them too; never per send.  They hold
    for every AE in the process: the forwarder sends an original file path as its bytes (never
    re-encoded), and the Storage SCP receives into memory, where its capped buffer bounds it."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.STORE_RECV_CHUNKED_DATASET = False


def process_settings() -> dict[str, bool]:
    """The values :func:`configure_pynetdicom` sets, as they are now (for tests and diagnostics)."""
    return {"STORE_SEND_CHUNKED_DATASET": bool(_config.STORE_SEND_CHUNKED_DATASET),
            "STORE_RECV_CHUNKED_DATASET": bool(_config.STORE_RECV_CHUNKED_DATASET)}


# AE, association and server ----------------------------------------------------------------------
def register_server(ae: Any, server: Any) -> None:  # noqa: ANN401 - pynetdicom AE and server
    """Record a listener we started ourselves as ``start_server`` does, so ``ae.shutdown()`` sees it."""
    ae._servers.append(server)


def server_of(assoc: Any) -> Any:  # noqa: ANN401 - pynetdicom Association -> AssociationServer | None
    """The listener that accepted ``assoc`` (None for an association we requested)."""
    return getattr(assoc, "_server", None)


def raw_socket(assoc: Any) -> socket.socket | None:  # noqa: ANN401 - pynetdicom Association
    """The TCP (or TLS) socket of ``assoc``'s connection, None once closed."""
    return getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)


def end_idle(assoc: Any) -> None:  # noqa: ANN401 - pynetdicom Association
    """Close the connection of an association with nothing in flight and wake an acceptor still
    waiting for its A-ASSOCIATE-RQ, instead of waiting out pynetdicom's ACSE/ARTIM timers."""
    sock = getattr(assoc.dul, "socket", None)
    if sock is not None and sock.socket is not None:
        sock.close()  # Evt17: the DUL state machine goes idle
    assoc.dul.to_user_queue.put(None)


def set_reject_reason(assoc: Any, why: str) -> None:  # noqa: ANN401 - pynetdicom Association
    """Keep why we rejected ``assoc`` ourselves, for the EVT_REJECTED handler (pynetdicom has no field)."""
    assoc.pb_reject_reason = why


def reject_reason(assoc: Any) -> str | None:  # noqa: ANN401 - pynetdicom Association
    """What :func:`set_reject_reason` kept, or None."""
    return getattr(assoc, "pb_reject_reason", None)


def log_id(assoc: Any) -> str:  # noqa: ANN401 - pynetdicom Association
    """A short id for ``assoc`` on its log lines (log_format = "json"), made on first use."""
    value = getattr(assoc, "pb_log_id", None)
    if value is None:
        import uuid

        value = assoc.pb_log_id = uuid.uuid4().hex[:12]
    return value


def has_log_id(assoc: Any) -> bool:  # noqa: ANN401 - pynetdicom Association
    return getattr(assoc, "pb_log_id", None) is not None


def first_ups_refusal(assoc: Any) -> bool:  # noqa: ANN401 - pynetdicom Association
    """True the first time it is called for ``assoc`` (one UPS refusal logged per association)."""
    if getattr(assoc, "pb_ups_refused", False):
        return False
    assoc.pb_ups_refused = True
    return True


def socket_of(assoc_socket: AssociationSocket) -> socket.socket | None:
    """The raw socket inside a pynetdicom ``AssociationSocket`` (None once closed)."""
    return assoc_socket.socket


def upgrade_association(assoc: Any, *, socket_class: type, dul_class: type, dimse_class: type,  # noqa: ANN401
                        acse_class: type) -> None:
    """Swap the classes of the objects pynetdicom made for an accepted association to our subclasses
    (they only add methods).  pynetdicom has no factory hooks for them; the DUL thread captured the
    original ``run_reactor`` when it was made, so its target is pointed at the new one."""
    if type(assoc.dul.socket) is AssociationSocket:
        assoc.dul.socket.__class__ = socket_class
    if type(assoc.dul) is DULServiceProvider:
        assoc.dul.__class__ = dul_class
        assoc.dul._target = assoc.dul.run_reactor
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = dimse_class
    if type(assoc.acse) is ACSE:
        assoc.acse.__class__ = acse_class


# DUL ---------------------------------------------------------------------------------------------
class DULHooks(DULServiceProvider):
    """pynetdicom's DUL with its PDU read replaced by :meth:`read_pdu`, and named access to its queues."""

    def _read_pdu_data(self) -> None:
        self.read_pdu()

    def read_pdu(self) -> None:  # pragma: no cover - replaced by the subclass
        super()._read_pdu_data()

    @property
    def transport(self) -> Any:  # noqa: ANN401 - the association's AssociationSocket (or None)
        return self.socket

    @property
    def artim_timeout(self) -> float | None:
        return self.artim_timer.timeout

    def deliver(self, pdu: bytearray) -> None:
        """Decode a whole PDU we read and hand it to the state machine (raises on malformed content)."""
        decoded, event = self._decode_pdu(pdu)
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def queue_event(self, event: str) -> None:
        """Queue a state machine event: ``Evt17`` (transport closed), ``Evt19`` (invalid PDU: A-ABORT)."""
        self.event_queue.put(event)

    def wake_acceptor(self) -> None:
        """An acceptor waiting for its A-ASSOCIATE-RQ gives up now."""
        self.to_user_queue.put(None)


def queue_event(dul: Any, event: str) -> None:  # noqa: ANN401 - pynetdicom DULServiceProvider
    """:meth:`DULHooks.queue_event` for a DUL of any class."""
    dul.event_queue.put(event)


def dul_socket(dul: Any) -> Any:  # noqa: ANN401 - pynetdicom DULServiceProvider -> AssociationSocket
    return dul.socket


# DIMSE -------------------------------------------------------------------------------------------
def start_message(dimse: Any, new_buffer: Callable[[], BytesIO]) -> None:  # noqa: ANN401 - DIMSEServiceProvider
    """Begin receiving a DIMSE message, when none is under way, into a data set buffer from ``new_buffer``."""
    if dimse.message is None:
        dimse.message = DIMSEMessage()
        dimse.message.data_set = new_buffer()


def command_bytes(dimse: Any) -> int:  # noqa: ANN401 - pynetdicom DIMSEServiceProvider
    """Bytes of the command set of the message being received."""
    return dimse.message.encoded_command_set.tell() if dimse.message is not None else 0


def drop_message(dimse: Any) -> None:  # noqa: ANN401 - pynetdicom DIMSEServiceProvider
    dimse.message = None


# ACSE and the request handler --------------------------------------------------------------------
class ACSEHooks(ACSE):
    """pynetdicom's ACSE with acceptor negotiation going through :meth:`negotiate_as_acceptor`."""

    def _negotiate_as_acceptor(self) -> None:
        self.negotiate_as_acceptor()

    def negotiate_as_acceptor(self) -> None:
        """pynetdicom's own negotiation (a subclass checks its limits first)."""
        super()._negotiate_as_acceptor()

    def reject_local_limit(self, why: str) -> None:
        """Reject the A-ASSOCIATE-RQ: rejected-transient, service-provider (presentation), local limit
        exceeded; ``why`` goes to the EVT_REJECTED handler through :func:`reject_reason`."""
        self.requestor.ae_title = self.requestor.primitive.calling_ae_title
        set_reject_reason(self.assoc, why)
        self.send_reject(0x02, 0x03, 0x02)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


class RequestHandlerHooks(RequestHandler):
    """pynetdicom's request handler; :meth:`upgrade_association` sees each association it makes."""

    def _create_association(self):  # noqa: ANN202 - returns pynetdicom's Association
        assoc = super()._create_association()
        self.upgrade_association(assoc)
        return assoc

    def upgrade_association(self, assoc: Any) -> None:  # noqa: ANN401
        """Called with each new association before its thread starts (a subclass swaps classes)."""
