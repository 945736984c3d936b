"""Deadlines on the DICOM transport: a peer that trickles bytes cannot hold a slot.

A whole PDU must arrive within its deadline (``pdu_deadline_floor``, or ``pdu_deadline_per_mib`` per MiB
announced) and the A-ASSOCIATE-RQ within the ARTIM timeout counted from connect.  Real loopback sockets
from several source addresses (127.0.0.2..) against a running Storage SCP, and pynetdicom as the normal
peer.  The per-read timeout (``network_timeout``) is 30 s here, so only the deadlines can drop the peers.
"""

from __future__ import annotations

import logging
import select
import shutil
import socket
import struct
import threading
import time

from sqlalchemy import select as sql_select

from dicom_support import run_dcmtk, running_receiver, scu_ae
from hostile_support import assoc_rq, echo_ok, read_one_pdu
from waiting import wait_until
from pacsbridge.dicom.fast_transport import TransportLimits
from pacsbridge.store.models import Event

ARTIM_S = 4.0
TRICKLE_EVERY_S = 1.0
ADDRESSES = [f"127.0.0.{i}" for i in range(2, 6)]  # 4 addresses x 8 = 32 = twice max_associations


class Trickler:
    """Sockets that each send the bytes of a valid A-ASSOCIATE-RQ one at a time, ``TRICKLE_EVERY_S`` apart,
    and note when the server closed them."""

    def __init__(self, port: int, per_address: int) -> None:
        self.socks: list[socket.socket] = []
        self.connected_at: list[float] = []
        self.opened_at = time.monotonic()
        for address in ADDRESSES:
            for _ in range(per_address):
                s = socket.socket()
                s.bind((address, 0))
                s.connect(("127.0.0.1", port))
                self.socks.append(s)
                self.connected_at.append(time.monotonic())
        self.closed_after: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        payload = assoc_rq()
        sent = 0
        next_byte = time.monotonic()
        while not self._stop.is_set() and len(self.closed_after) < len(self.socks):
            if time.monotonic() >= next_byte and sent < len(payload):
                for i, s in enumerate(self.socks):
                    if i not in self.closed_after:
                        try:
                            s.send(payload[sent:sent + 1])
                        except OSError:
                            self.closed_after[i] = time.monotonic() - self.connected_at[i]
                sent += 1
                next_byte += TRICKLE_EVERY_S
            open_socks = [s for i, s in enumerate(self.socks) if i not in self.closed_after]
            readable, _, _ = select.select(open_socks, [], [], 0.05)
            for s in readable:
                i = self.socks.index(s)
                try:
                    data = s.recv(4096)  # an A-ABORT, then the end
                except OSError:
                    data = b""
                if not data:
                    self.closed_after[i] = time.monotonic() - self.connected_at[i]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks:
            s.close()


def test_32_trickling_peers_are_dropped_at_artim_and_echo_gets_through(tmp_path, caplog, monkeypatch) -> None:
    """32 sockets from 4 addresses trickle an A-ASSOCIATE-RQ one byte a second: they fill every connection
    slot (a normal C-ECHO is turned away), are aborted when ARTIM (4 s from connect) runs out although each
    read is well inside the 30 s read timeout, and a normal C-ECHO then succeeds at once.  Eviction (the
    next test) is put out of reach here, so that ARTIM alone is what drops them."""
    import pacsbridge.dicom.listener as listener

    monkeypatch.setattr(listener, "EVICT_MIN_AGE", 3600.0)
    with caplog.at_level(logging.WARNING, logger="pacsbridge.dicom.fast_transport"), \
            running_receiver(tmp_path, acse_timeout=ARTIM_S, network_timeout=30, max_associations=16,
                             max_associations_per_peer=8) as r:
        trickler = Trickler(r.port, per_address=8)
        try:
            assert trickler.connected_at[-1] - trickler.opened_at < 1.0, "connecting took too long to test this"
            time.sleep(0.5)  # on purpose: a window in which no trickler may be closed yet
            assert not trickler.closed_after, "the receiver closed trickling peers before any deadline"
            assert not echo_ok(r.port), "32 trickling peers should hold every slot at first"
            # No newcomer now (it would evict the oldest tricklers, see the next test): ARTIM alone.
            wait_until(lambda: len(trickler.closed_after) >= 32, ARTIM_S + 5, "all 32 tricklers dropped at ARTIM")
            echo_at = time.monotonic() - trickler.opened_at if echo_ok(r.port) else None
        finally:
            trickler.close()
        assert echo_at is not None and echo_at < ARTIM_S + 3, f"C-ECHO only after {echo_at} s"
        print(f"first C-ECHO success {echo_at:.2f} s after the tricklers connected; tricklers closed after "
              f"{min(trickler.closed_after.values()):.2f}-{max(trickler.closed_after.values()):.2f} s")
        if shutil.which("echoscu"):  # and DCMTK's echoscu, a peer nobody here wrote
            assert run_dcmtk("echoscu", "-aec", "PACSBRIDGE", "127.0.0.1", str(r.port)).returncode == 0
        assert len(trickler.closed_after) == 32
        assert all(ARTIM_S - 0.5 <= t < ARTIM_S + 3 for t in trickler.closed_after.values()), trickler.closed_after
        with r.sessions() as s:
            aborted = list(s.scalars(sql_select(Event).where(Event.kind == "association_aborted")))
        assert len(aborted) == 32 and all("ARTIM" in e.detail for e in aborted), [e.detail for e in aborted]
        assert {e.peer.split(":")[0] for e in aborted} == set(ADDRESSES)
    lines = [rec.getMessage() for rec in caplog.records
             if rec.levelno == logging.WARNING and "ARTIM" in rec.getMessage()]
    assert len(lines) == 32 and {ln.split()[3].split(":")[0] for ln in lines} == set(ADDRESSES)


def test_a_pdu_trickled_inside_an_association_is_aborted_at_its_deadline(tmp_path, caplog) -> None:
    """After A-ASSOCIATE-AC: a P-DATA-TF announcing 1000 bytes sent one byte every 0.5 s is aborted after the
    2 s floor (the 30 s read timeout never fires); the same bytes sent at once are served."""
    with caplog.at_level(logging.WARNING, logger="pacsbridge.dicom.fast_transport"), \
            running_receiver(tmp_path, network_timeout=30, pdu_deadline_floor=2.0) as r:
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.sendall(assoc_rq())
            assert read_one_pdu(s)[:1] == b"\x02"  # A-ASSOCIATE-AC
            started = time.monotonic()
            s.sendall(struct.pack(">BBL", 0x04, 0, 1000))
            s.settimeout(0.5)
            closed_after = None
            while time.monotonic() - started < 10:
                try:
                    s.send(b"\x00")
                    data = s.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data or data[:1] == b"\x07":  # A-ABORT, then the end
                    closed_after = time.monotonic() - started
                    break
        assert closed_after is not None and 1.5 <= closed_after < 4, closed_after
        assert any("PDU not received within its deadline" in rec.getMessage() and "127.0.0.1" in rec.getMessage()
                   for rec in caplog.records)
        assert echo_ok(r.port)  # normal peers are served at normal speed


def test_pdu_deadline_grows_with_the_announced_length_but_memory_does_not() -> None:
    limits = TransportLimits(pdu_deadline_floor=5.0, pdu_deadline_per_mib=10.0)
    assert limits.pdu_deadline(16_384) == 5.0
    assert limits.pdu_deadline(4 * 1_048_576) == 40.0
    assert limits.pdu_deadline(0) == 5.0


def test_a_fast_peer_with_large_pdus_is_not_affected(tmp_path) -> None:
    """A 4 MiB maximum PDU sent at loopback speed is far inside the deadline (the deadline is a floor of
    seconds, not a throughput requirement a LAN could miss)."""
    from dicom_support import make_image

    with running_receiver(tmp_path, pdu_deadline_floor=1.0, pdu_deadline_per_mib=1.0) as r:
        ae = scu_ae()
        ae.maximum_pdu_size = 4_194_304
        assoc = ae.associate("127.0.0.1", r.port, ae_title="PACSBRIDGE")
        assert assoc.is_established
        try:
            ds = make_image(rows=1024, cols=1024)
            assert assoc.send_c_store(ds).Status == 0
        finally:
            assoc.release()


def test_a_new_peer_evicts_the_oldest_unassociated_sockets_when_the_listener_is_full(tmp_path) -> None:
    """With the default ARTIM (30 s) 32 trickling sockets would hold every slot for 30 s: once they are
    older than EVICT_MIN_AGE, a real peer's connection evicts the oldest of them and its C-ECHO succeeds at
    once (pynetdicom and DCMTK), while the tricklers that were not evicted stay connected."""
    from pacsbridge.dicom.listener import EVICT_MIN_AGE

    with running_receiver(tmp_path, acse_timeout=30, network_timeout=30, max_associations=16,
                          max_associations_per_peer=8) as r:
        trickler = Trickler(r.port, per_address=8)
        try:
            time.sleep(EVICT_MIN_AGE + 0.5)  # on purpose: the tricklers must be old enough to be evicted
            t0 = time.monotonic()
            assert echo_ok(r.port), "a real peer should get in by evicting the oldest trickling sockets"
            took = time.monotonic() - t0
            if shutil.which("echoscu"):
                assert run_dcmtk("echoscu", "-aec", "PACSBRIDGE", "127.0.0.1", str(r.port)).returncode == 0
            # Every evicted trickler has seen its socket closed once the closures match the recorded evictions.
            wait_until(lambda: 0 < len(trickler.closed_after) == len(evicted_events(r)), 5,
                       lambda: f"{len(evicted_events(r))} evictions recorded, {len(trickler.closed_after)} seen closed")
            still_open = 32 - len(trickler.closed_after)
        finally:
            trickler.close()
        assert took < 3.0, f"C-ECHO took {took:.1f} s while the listener was full"
        assert 0 < still_open < 32, f"{still_open} trickling sockets still open: eviction should take only some"
        evicted = evicted_events(r)
        assert len(evicted) == 32 - still_open, (len(evicted), still_open)


def evicted_events(r) -> list[Event]:  # noqa: ANN001 - a dicom_support.Receiver
    with r.sessions() as s:
        return [e for e in s.scalars(sql_select(Event).where(Event.kind == "association_aborted"))
                if "evicted" in (e.detail or "")]
