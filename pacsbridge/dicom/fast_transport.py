"""pynetdicom's receive path, made fast and bounded, plugged in through its public server hooks.

Speed: pynetdicom's ``AssociationSocket.recv`` reads in 4 KiB pieces, one Python call each (~1,800
calls per 7 MB radiograph, the largest single cost of receiving).  :class:`FastAssociationSocket`
reads straight into one pre-sized buffer with ``recv_into``.

Bounds (any device that reaches the port may be hostile): memory grows with bytes received, never
with a length a peer announces.

* :class:`BoundedDUL` reads each PDU's 6-byte header first and refuses (A-ABORT, logged with the
  peer address) a PDU longer than we allow *before* allocating anything of that size: P-DATA-TF up
  to the maximum PDU length we advertised, every other PDU (A-ASSOCIATE-RQ ...) up to 64 KiB.
* A whole PDU must arrive within a deadline counted from its first byte: ``pdu_deadline_floor`` seconds,
  or ``pdu_deadline_per_mib`` seconds per MiB of the length it announces when that is longer (the
  deadline only bounds time: memory still grows only with bytes received).  Before the association is
  accepted the deadline is also cut to what is left of the ARTIM timer, which pynetdicom starts at
  connect: the A-ASSOCIATE-RQ must be complete within ``acse_timeout`` of the TCP connect, however the
  peer spaces its bytes.  A peer past either is A-ABORTed, logged (WARNING, with its address) and
  recorded, and its thread and slot are freed at once.  Each socket read also has a timeout
  (``read_timeout``); an idle association is bounded by pynetdicom's network timeout.
* :class:`BoundedDIMSE` caps a DIMSE command set (64 KiB) and a C-STORE data set
  (``max_dataset_bytes``): past the cap the fragments are read and dropped, and the handler gets
  a :class:`CappedBuffer` marked ``overflowed`` so it answers a 0xA7xx status.
* :class:`BoundedACSE` rejects an association beyond ``max_associations_per_peer`` (transient,
  local limit exceeded).

The listening side (connection flood guard, eviction, TLS handshake, the request handler that
installs these classes) is :mod:`pacsbridge.dicom.listener`.

The classes replace pynetdicom's in place (``__class__`` swaps of objects pynetdicom made) because
pynetdicom has no factory hooks for them; they only override methods and add no state of their own
beyond what is set here.  Every pynetdicom internal they need is reached through
:mod:`pacsbridge.dicom.compat`.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Callable

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import InvalidEventError
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

from pacsbridge.dicom import compat

log = logging.getLogger(__name__)

#: Largest PDU other than P-DATA-TF we read (an A-ASSOCIATE-RQ proposing 128 contexts is ~20 KiB).
MAX_ASSOCIATION_PDU = 64 * 1024
#: Largest DIMSE command set (a few hundred bytes in practice).
MAX_COMMAND_BYTES = 64 * 1024

_P_DATA_TF = 0x04
_KNOWN_PDU_TYPES = frozenset(range(1, 8))
# A-ABORT reasons, source 2 (service provider), PS3.8 9.3.8
_ABORT_NOT_SPECIFIED = 0x00
_ABORT_UNRECOGNIZED_PDU = 0x01
_ABORT_UNEXPECTED_PDU = 0x02
_ABORT_INVALID_PARAMETER = 0x06


@dataclass
class TransportLimits:
    """The bounds of the receive path (see the module docstring); set by the Storage SCP."""

    max_pdu: int = 4_194_304                 # P-DATA-TF: what we advertise as our maximum PDU length
    max_association_pdu: int = MAX_ASSOCIATION_PDU
    max_command_bytes: int = MAX_COMMAND_BYTES
    max_dataset_bytes: int = 128 * 1024 * 1024
    read_timeout: float = 60.0               # seconds a peer may stay silent in the middle of a PDU
    pdu_deadline_floor: float = 5.0          # seconds a whole PDU may take, at least ...
    pdu_deadline_per_mib: float = 10.0       # ... or this per MiB of its announced length when longer
    tls_handshake_timeout: float = 10.0
    max_associations: int = 16               # total (pynetdicom enforces it at A-ASSOCIATE)
    max_associations_per_peer: int = 8       # per peer IP address
    #: ``on_refused(kind, reason, peer)``: records refusals that never reach an association handler.
    on_refused: Callable[[str, str, str], None] | None = field(default=None, repr=False)

    def pdu_limit(self, pdu_type: int) -> int:
        return self.max_pdu if pdu_type == _P_DATA_TF else self.max_association_pdu

    def pdu_deadline(self, length: int) -> float:
        """Seconds a PDU announcing ``length`` bytes may take to arrive in full."""
        return max(self.pdu_deadline_floor, self.pdu_deadline_per_mib * length / 1_048_576)


class DeadlinePassed(TimeoutError):
    """A PDU did not arrive in full by its deadline; ``got`` bytes of the buffer were filled."""

    def __init__(self, got: int) -> None:
        super().__init__(f"deadline passed after {got} bytes")
        self.got = got


class FastAssociationSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        got = self.recv_into(buf, 0)
        return buf if got == nr_bytes else buf[:got]

    def recv_into(self, buf: bytearray, start: int, deadline: float | None = None,
                  read_timeout: float | None = None) -> int:
        """Fill ``buf[start:]``; returns the bytes now in ``buf`` (short when the peer closed).

        ``deadline`` (``time.monotonic()`` value): raise :class:`DeadlinePassed` once it passes, however
        the peer spaces its bytes; each read then waits at most ``read_timeout`` or until the deadline."""
        sock = compat.socket_of(self)
        assert sock is not None
        view = memoryview(buf)
        got, total = start, len(buf)
        try:
            while got < total:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DeadlinePassed(got)
                    sock.settimeout(left if read_timeout is None else min(left, read_timeout))
                try:
                    n = sock.recv_into(view[got:], total - got)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise DeadlinePassed(got) from None
                    raise
                if n == 0:  # connection closed: return what we have
                    break
                got += n
        finally:
            del view  # release the export so the bytearray may be resized by pynetdicom
            if deadline is not None and read_timeout is not None:
                try:
                    sock.settimeout(read_timeout)
                except OSError:
                    pass
        return got


class CappedBuffer(BytesIO):
    """A C-STORE data set buffer that stops keeping bytes past ``cap``; ``overflowed`` then says so
    and ``received`` counts every byte that arrived (kept or not)."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap
        self.received = 0
        self.overflowed = False

    def write(self, data: Any) -> int:  # noqa: ANN401 - bytes-like
        n = len(data)
        self.received += n
        if self.overflowed:
            return n
        if self.tell() + n > self.cap:
            self.overflowed = True
            self.seek(0)
            self.truncate()  # free what was kept: this data set will be refused anyway
            return n
        return super().write(data)


def dul_peer(dul: DULServiceProvider) -> str:
    """``address:port`` of the peer of a DUL (for log lines)."""
    try:
        rq = dul.assoc.requestor
        return f"{rq.address}:{rq.port}"
    except Exception:  # noqa: BLE001 - only for a log line
        return "?"


def association_limits(assoc: Any) -> TransportLimits:  # noqa: ANN401 - pynetdicom Association
    """The limits of the listener that accepted ``assoc`` (defaults otherwise)."""
    return getattr(compat.server_of(assoc), "pb_limits", None) or TransportLimits()


class BoundedDUL(compat.DULHooks):
    """pynetdicom's DUL with a bounded, single-buffer PDU read (replaces pynetdicom's PDU read)."""

    def read_pdu(self) -> None:
        sock = self.transport
        assert isinstance(sock, FastAssociationSocket)
        limits = association_limits(self.assoc)
        started = time.monotonic()
        artim = self._artim_deadline()
        deadline = started + limits.pdu_deadline_floor
        if artim is not None:
            deadline = min(deadline, artim)
        header = bytearray(6)
        try:
            got = sock.recv_into(header, 0, deadline, limits.read_timeout)
        except DeadlinePassed as exc:
            self._too_slow(exc.got, 6, started, artim is not None and artim <= deadline)
            return
        except (OSError, TimeoutError) as exc:
            self._drop(f"connection lost while reading a PDU header: {type(exc).__name__}")
            return
        if got < 6:
            if got or self.assoc.is_established:
                self._drop(f"connection closed {'inside a PDU header' if got else 'without releasing the association'}")
            else:
                self._drop(None)  # closed between PDUs before or after an association: a normal end
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in _KNOWN_PDU_TYPES:
            self._refuse(_ABORT_UNRECOGNIZED_PDU, f"unknown PDU type 0x{pdu_type:02X}")
            return
        limit = limits.pdu_limit(pdu_type)
        if length > limit:
            self._refuse(_ABORT_INVALID_PARAMETER,
                         f"PDU type 0x{pdu_type:02X} announces {length} bytes, more than our limit of {limit}")
            return
        pdu = bytearray(6 + length)  # bounded by `limit`
        pdu[:6] = header
        deadline = started + limits.pdu_deadline(length)
        if artim is not None:
            deadline = min(deadline, artim)
        try:
            got = sock.recv_into(pdu, 6, deadline, limits.read_timeout)
        except DeadlinePassed as exc:
            self._too_slow(exc.got, 6 + length, started, artim is not None and artim <= deadline)
            return
        except (OSError, TimeoutError) as exc:
            self._drop(f"connection lost in the middle of a {length}-byte PDU: {type(exc).__name__}")
            return
        if got < 6 + length:
            self._drop(f"connection closed after {got} of {6 + length} bytes of a PDU")
            return
        if pdu_type == 0x01:
            self.pb_rq_received = True  # the ARTIM deadline from connect is met
        try:
            self.deliver(pdu)
        except Exception as exc:  # noqa: BLE001 - malformed PDU content
            self._refuse(_ABORT_INVALID_PARAMETER, f"undecodable PDU type 0x{pdu_type:02X}: {type(exc).__name__}")
            return

    def _artim_deadline(self) -> float | None:
        """Until the A-ASSOCIATE-RQ has arrived: the TCP connect time plus the ARTIM timeout, as a
        ``time.monotonic()`` value (pynetdicom starts its own ARTIM timer only once its reactor has run,
        which a peer sending at once can get ahead of); None afterwards."""
        connected = getattr(self, "pb_connected_at", None)
        timeout = self.artim_timeout
        if connected is None or timeout is None or getattr(self, "pb_rq_received", False) or self.assoc.is_established:
            return None
        return connected + timeout

    def _too_slow(self, got: int, expected: int, started: float, artim: bool) -> None:
        limits = association_limits(self.assoc)
        took = time.monotonic() - started
        if artim:
            why = (f"no complete A-ASSOCIATE-RQ within the ARTIM timeout ({self.artim_timeout:g} s from "
                   f"connect; {got} of {expected} bytes of a PDU after {took:.1f} s)")
        else:
            why = (f"PDU not received within its deadline ({got} of {expected} bytes after {took:.1f} s; "
                   f"pdu_deadline_floor {limits.pdu_deadline_floor:g} s, pdu_deadline_per_mib "
                   f"{limits.pdu_deadline_per_mib:g} s)")
        self._refuse(_ABORT_NOT_SPECIFIED, why)

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        except InvalidEventError as exc:
            # pynetdicom raises this out of its thread for some event orders a hostile (or broken) peer can
            # cause, e.g. a P-DATA-TF sent before our A-ASSOCIATE-AC: abort instead of dying noisily.
            self._refuse(_ABORT_UNEXPECTED_PDU, f"protocol violation: {exc}")
            self.assoc.is_aborted, self.assoc.is_established = True, False
            self.kill_dul()

    def _drop(self, why: str | None) -> None:
        """The transport is gone or useless: close it (Evt17) and wake an acceptor still waiting."""
        if why:
            log.warning("DICOM connection from %s dropped: %s", dul_peer(self), why)
        self._close_transport()

    def _refuse(self, reason: int, why: str) -> None:
        """A-ABORT (source: service provider) then close, without reading what the peer announced."""
        peer = dul_peer(self)
        log.warning("DICOM connection from %s aborted: %s", peer, why)
        limits = association_limits(self.assoc)
        if limits.on_refused is not None:
            limits.on_refused("association_aborted", why, peer)
        sock = self.transport
        raw = compat.socket_of(sock) if sock is not None else None
        if raw is not None:
            abort = A_ABORT_RQ()
            abort.source = 0x02
            abort.reason_diagnostic = reason
            try:
                raw.sendall(abort.encode())
            except OSError:
                pass
        self._close_transport()

    def _close_transport(self) -> None:
        sock = self.transport
        if sock is not None and compat.socket_of(sock) is not None:
            sock.close()  # queues Evt17: the state machine ends the association
        else:
            self.queue_event("Evt17")
        if not self.assoc.is_established:
            self.wake_acceptor()  # an acceptor waiting for its A-ASSOCIATE-RQ gives up now


class BoundedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with a capped command set and data set per message."""

    def receive_primitive(self, primitive: Any) -> None:  # noqa: ANN401 - P_DATA
        limits = association_limits(self.assoc)
        compat.start_message(self, lambda: CappedBuffer(limits.max_dataset_bytes))
        for _, data in primitive.presentation_data_value_list:
            if data and data[0] & 1 and compat.command_bytes(self) + len(data) > limits.max_command_bytes:
                peer = dul_peer(self.dul)
                log.warning("DICOM association with %s aborted: DIMSE command set longer than %d bytes",
                            peer, limits.max_command_bytes)
                if limits.on_refused is not None:
                    limits.on_refused("association_aborted", "DIMSE command set too long", peer)
                compat.drop_message(self)
                compat.queue_event(self.dul, "Evt19")  # invalid PDU: A-ABORT and end the association
                return
        try:
            super().receive_primitive(primitive)
        except Exception as exc:  # noqa: BLE001 - e.g. a command set without Command Field (found by fuzzing)
            # pynetdicom would log a traceback and abort; do the same with one line naming the peer.
            peer = dul_peer(self.dul)
            why = f"undecodable DIMSE message: {type(exc).__name__}: {str(exc)[:200]}"
            log.warning("DICOM association with %s aborted: %s", peer, why)
            if limits.on_refused is not None:
                limits.on_refused("association_aborted", why, peer)
            compat.drop_message(self)
            compat.queue_event(self.dul, "Evt19")


class BoundedACSE(compat.ACSEHooks):
    """Rejects an A-ASSOCIATE-RQ beyond ``max_associations_per_peer`` (transient, local limit exceeded)."""

    def negotiate_as_acceptor(self) -> None:
        limits = association_limits(self.assoc)
        address = self.assoc.requestor.address
        same_peer = [a for a in self.assoc.ae.active_associations
                     if a is not self.assoc and a.is_acceptor and a.requestor.address == address]
        if len(same_peer) >= limits.max_associations_per_peer:
            self.reject_local_limit(f"too many associations from {address} (max_associations_per_peer = "
                                    f"{limits.max_associations_per_peer})")
            return
        super().negotiate_as_acceptor()
