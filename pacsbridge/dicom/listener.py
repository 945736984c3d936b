"""The DICOM listener: pynetdicom's threaded server and request handler with the bounded transport of
:mod:`pacsbridge.dicom.fast_transport` installed for each association, plugged in through
``AE.make_server``'s ``server_class`` and ``request_handler`` hooks.

* :class:`BoundedServerMixin` closes TCP connections beyond twice the association limits
  (``max_associations``, ``max_associations_per_peer``) before a thread is spent on them.
* Eviction: when the listener is full, a new connection makes room by shutting down the oldest
  connections (at least ``EVICT_MIN_AGE`` old) that have not sent their A-ASSOCIATE-RQ, so sockets that
  trickle or idle cannot keep real senders out for as long as ARTIM allows.
* TLS: the handshake runs in the connection's own thread with a timeout (pynetdicom does it in the
  listener thread, where one silent TLS client would stall every other connection).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from pacsbridge.dicom import compat
from pacsbridge.dicom.fast_transport import (
    BoundedACSE, BoundedDIMSE, BoundedDUL, FastAssociationSocket, TransportLimits, association_limits, dul_peer,
)

log = logging.getLogger(__name__)


class FastRequestHandler(compat.RequestHandlerHooks):
    """pynetdicom's request handler with the fast and bounded classes above for each association."""

    def handle(self) -> None:
        try:
            if isinstance(self.request, ssl.SSLSocket) and not self._tls_handshake():
                return
            super().handle()  # starts the association thread, which from now on counts as a connection
        finally:
            handed_over = getattr(self.server, "pb_handed_over", None)
            if handed_over is not None:
                handed_over(self.client_address)

    def _tls_handshake(self) -> bool:
        limits: TransportLimits = getattr(self.server, "pb_limits", None) or TransportLimits()
        sock: ssl.SSLSocket = self.request  # type: ignore[assignment]
        peer = f"{self.client_address[0]}:{self.client_address[1]}"
        try:
            sock.settimeout(limits.tls_handshake_timeout)
            sock.do_handshake()
            return True
        except (ssl.SSLError, OSError) as exc:
            why = f"TLS handshake failed: {getattr(exc, 'reason', None) or type(exc).__name__}"
            log.warning("DICOM connection from %s refused: %s", peer, why)
            if limits.on_refused is not None:
                limits.on_refused("association_rejected", why, peer)
            self.server.shutdown_request(sock)  # pynetdicom closes it only on an exception
            return False

    def upgrade_association(self, assoc: Any) -> None:  # noqa: ANN401 - pynetdicom Association
        limits: TransportLimits = getattr(self.server, "pb_limits", None) or TransportLimits()
        # The socket is already wired into the association (and has queued its connection event), so
        # upgrade the objects in place: the subclasses only replace methods.
        compat.upgrade_association(assoc, socket_class=FastAssociationSocket, dul_class=BoundedDUL,
                                   dimse_class=BoundedDIMSE, acse_class=BoundedACSE)
        if isinstance(assoc.dul, BoundedDUL):
            assoc.dul.pb_connected_at = time.monotonic()  # the A-ASSOCIATE-RQ must be complete by ARTIM from here
        self.request.settimeout(limits.read_timeout)  # pynetdicom leaves accepted sockets blocking forever


#: Short names of certificate subject attributes (RFC 4514 section 3, plus the usual OpenSSL ones).
_SUBJECT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
                  "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "EMAILADDRESS",
                  "domainComponent": "DC", "userId": "UID", "serialNumber": "SERIALNUMBER"}


def peer_certificate_subject(assoc: Any) -> str | None:  # noqa: ANN401 - pynetdicom Association
    """The verified client certificate subject of the association's connection (``CN=..,O=..``, most
    specific first), or None: plain DICOM, or TLS without a client certificate."""
    sock = compat.raw_socket(assoc)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()  # only verified certificates are returned as a dict
    except (ValueError, OSError):
        return None
    if not cert or not cert.get("subject"):
        return None
    parts = [f"{_SUBJECT_NAMES.get(k, k)}={v}" for rdn in cert["subject"] for k, v in rdn]
    return ",".join(reversed(parts))


class BoundedServerMixin:
    """Listener side: TLS without a handshake in the accept loop, and a connection flood guard."""

    pb_limits: TransportLimits
    #: listen() backlog (socketserver's default is 5: a burst of connects would wait for SYN retries).
    request_queue_size = 128
    _pb_last_warning = 0.0
    #: Connections accepted whose association thread has not started yet (so not in active_associations).
    _pb_pending: list[tuple[str, int]] | None = None
    _pb_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()  # type: ignore[attr-defined]
        context = getattr(self, "ssl_context", None)
        if context is not None:
            # Handshake later, in the connection's thread, with a timeout (FastRequestHandler.handle).
            sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:  # noqa: ANN401
        """Close a connection beyond twice the association limits before a thread is spent on it (within
        them, pynetdicom and :class:`BoundedACSE` answer the A-ASSOCIATE-RQ with a proper rejection)."""
        limits = self.pb_limits
        with self._pb_lock:
            if self._pb_pending is None:
                self._pb_pending = []
            # Both listeners (plain and TLS) share one AE, so count its acceptors, not this server's.  A
            # connection is pending until its thread runs, and briefly both: count each (address, port) once.
            acceptors = [a for a in self.ae.active_associations if a.is_acceptor]  # type: ignore[attr-defined]
            active = {(a.requestor.address, a.requestor.port) for a in acceptors} | set(self._pb_pending)
            same = sum(1 for address, _ in active if address == client_address[0])
            evicted: list[Any] = []
            if same < 2 * limits.max_associations_per_peer and len(active) >= limits.max_associations:
                # Full: make room by dropping the oldest connections that still have not sent their
                # A-ASSOCIATE-RQ, so idle or trickling sockets cannot keep a real sender out for as long
                # as ARTIM lets them (a real peer sends its request within milliseconds of connecting).
                evicted = _evict_unassociated(acceptors, len(active) - limits.max_associations + 1)
                active = active - {(a.requestor.address, a.requestor.port) for a in evicted}
            if len(active) < 2 * limits.max_associations and same < 2 * limits.max_associations_per_peer:
                self._pb_pending.append((client_address[0], client_address[1]))
                admitted = True
            else:
                admitted = False
        if evicted:
            _wait_gone(evicted, EVICT_WAIT)
        if admitted:
            return True
        now = time.monotonic()
        if now - self._pb_last_warning > 1.0:  # a flood must not flood the log too
            self._pb_last_warning = now
            log.warning("DICOM connection from %s:%s closed: %d connections open (%d from this address)",
                        client_address[0], client_address[1], len(active), same)
        return False

    def pb_handed_over(self, client_address: Any) -> None:  # noqa: ANN401
        with self._pb_lock:
            key = (client_address[0], client_address[1])
            if self._pb_pending and key in self._pb_pending:
                self._pb_pending.remove(key)


#: A connection must be this old (seconds, since connect) before a newcomer may evict it.
EVICT_MIN_AGE = 1.0
#: How long the accept loop waits for evicted connections' threads to end (only while evicting).
EVICT_WAIT = 0.5


def _evict_unassociated(acceptors: list[Any], count: int) -> list[Any]:
    """Shut down the ``count`` oldest acceptor connections (at least :data:`EVICT_MIN_AGE` old) whose
    A-ASSOCIATE-RQ has not arrived; their reactor threads then see end-of-file and end.  Returns them."""
    now = time.monotonic()
    waiting = []
    for assoc in acceptors:
        dul = assoc.dul
        connected = getattr(dul, "pb_connected_at", None)
        if connected is None or getattr(dul, "pb_rq_received", False) or assoc.is_established:
            continue
        if now - connected >= EVICT_MIN_AGE:
            waiting.append((connected, assoc))
    waiting.sort(key=lambda pair: pair[0])
    evicted = []
    for _, assoc in waiting[:max(count, 0)]:
        sock = compat.raw_socket(assoc)
        if sock is None:
            continue
        log.warning("DICOM connection from %s dropped: no A-ASSOCIATE-RQ after %.1f s and the listener is "
                    "full (oldest unassociated connection evicted for a new one)",
                    dul_peer(assoc.dul), now - assoc.dul.pb_connected_at)
        limits = association_limits(assoc)
        if limits.on_refused is not None:
            limits.on_refused("association_aborted", "evicted: no A-ASSOCIATE-RQ while the listener was full",
                              dul_peer(assoc.dul))
        try:
            sock.shutdown(socket.SHUT_RDWR)  # thread-safe: wakes the reactor's blocked read with EOF
        except OSError:
            pass
        evicted.append(assoc)
    return evicted


def _wait_gone(assocs: list[Any], timeout: float) -> None:
    """Give evicted associations' threads up to ``timeout`` seconds in all to end (so a newcomer's
    A-ASSOCIATE-RQ is not counted against slots that are already free)."""
    end = time.monotonic() + timeout
    for assoc in assocs:
        assoc.join(max(0.0, end - time.monotonic()))


class BoundedAssociationServer(BoundedServerMixin, ThreadedAssociationServer):
    """The threaded pynetdicom server with the bounds above; ``pb_limits`` is set right after creation."""

    pb_limits = TransportLimits()
