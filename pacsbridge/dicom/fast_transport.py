"""A faster receive path for pynetdicom, plugged in through its public server hooks.

pynetdicom's ``AssociationSocket.recv`` reads in 4 KiB pieces, one Python call each: ~1,800 calls
per 7 MB radiograph, the largest single cost of receiving.  This socket reads straight into one
pre-sized buffer with ``recv_into`` (as much as the kernel has, up to what is missing).
"""

from __future__ import annotations

from pynetdicom.transport import AssociationSocket, RequestHandler


class FastAssociationSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if n == 0:  # connection closed: return what we have (pynetdicom then reports Evt17)
                del view
                return buf[:got]
            got += n
        del view  # release the export so the bytearray may be resized by pynetdicom
        return buf


class FastRequestHandler(RequestHandler):
    """pynetdicom's request handler, with :class:`FastAssociationSocket` for each association."""

    def _create_association(self):  # noqa: ANN202 - returns pynetdicom's Association
        assoc = super()._create_association()
        # The socket is already wired into the association (and has queued its connection event), so
        # upgrade it in place: the subclass only replaces a method and adds no state.
        if type(assoc.dul.socket) is AssociationSocket:
            assoc.dul.socket.__class__ = FastAssociationSocket
        return assoc
