"""Hostile peers on the DICOM port: announced lengths, oversized data sets, deflate bombs, association
limits, wrong called AE, silent peers.  Real loopback connections (raw sockets and pynetdicom)."""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import ComputedRadiographyImageStorage
from sqlalchemy import select

from dicom_support import make_image, running_receiver, scu_ae, send_datasets
from hostile_support import (
    RELEASE_RQ, assoc_rq, c_store_pdus, dimse_statuses, echo_ok, encode_dataset, exchange, read_one_pdu, read_pdus, rss_bytes,
    running_serve,
)
from waiting import wait_until
from pacsbridge.store.models import Event, Instance

FOUR_GIB = 0xFFFFFFF0
RSS_BOUND = 256 * 1024 * 1024


def events(receiver, kind: str, wait_for: int = 0) -> list[Event]:
    """Events of ``kind``; with ``wait_for``, wait (up to 5 s) until that many are there: a rejection
    reaches the peer just before its handler has committed the event."""
    def found() -> list[Event]:
        with receiver.sessions() as s:
            return list(s.scalars(select(Event).where(Event.kind == kind)))

    if wait_for:
        wait_until(lambda: len(found()) >= wait_for, 5, f"{wait_for} {kind} event(s)")
    return found()


def spool_files(receiver) -> list:
    return [p for p in receiver.spool.root.rglob("*") if p.is_file()]


# -- the steering's check, against `pacsbridge serve` -----------------------------------------------
def test_eight_connections_announcing_4_gib_pdus_leave_memory_flat_and_echo_working(tmp_path):
    with running_serve(tmp_path) as d:
        assert echo_ok(d.port)
        idle = rss_bytes(d.pid)
        socks = []
        for i in range(8):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            if i < 4:  # before any association: an A-ASSOCIATE-RQ (or P-DATA) header claiming ~4 GiB
                s.sendall(bytes([0x01 if i % 2 == 0 else 0x04, 0]) + struct.pack(">L", FOUR_GIB))
            else:  # inside an established association: a P-DATA-TF header claiming ~4 GiB
                s.sendall(assoc_rq())
                s.settimeout(10)
                assert read_one_pdu(s)[:1] == b"\x02"  # the whole A-ASSOCIATE-AC
                s.sendall(b"\x04\x00" + struct.pack(">L", FOUR_GIB) + b"\x00" * 1000)
            socks.append(s)
        peak = idle
        deadline = time.monotonic() + 3  # a 3 s window of RSS samples: the measurement, not a wait
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(d.pid))
            time.sleep(0.02)
        answers = []
        for s in socks:
            pdus, closed = read_pdus(s, timeout=10)
            answers.append(([t for t, _ in pdus], closed))
            s.close()
        assert echo_ok(d.port), "the daemon must still answer C-ECHO"
        after = rss_bytes(d.pid)
        log = d.log()
    print(f"\nRSS idle {idle / 2**20:.1f} MiB, peak during 8 x 4 GiB announcements {peak / 2**20:.1f} MiB "
          f"(+{(peak - idle) / 2**20:.1f} MiB), after {after / 2**20:.1f} MiB")
    assert peak - idle < RSS_BOUND
    for types, closed in answers:
        assert types and types[-1] == 7 and closed, f"expected an A-ABORT then close, got {types}, closed={closed}"
    assert log.count("more than our limit") == 8
    assert "127.0.0.1:" in log  # logged with the peer address


# -- PDU limits --------------------------------------------------------------------------------
def test_association_pdu_over_64_kib_is_aborted_before_reading_it(tmp_path):
    with running_receiver(tmp_path) as r:
        pdus, closed, port = exchange(r.port, b"\x01\x00" + struct.pack(">L", 65 * 1024) + b"\x00" * 100)
        assert [t for t, _ in pdus] == [7] and closed
        assert pdus[0][1][2:4] == b"\x02\x06"  # source: service provider, reason: invalid parameter value
        ev = events(r, "association_aborted", wait_for=1)
        assert len(ev) == 1 and f":{port}" in ev[0].peer and "65536" in ev[0].detail
        assert echo_ok(r.port)


def test_p_data_up_to_the_advertised_maximum_is_accepted_and_above_is_aborted(tmp_path):
    max_pdu = 32768
    with running_receiver(tmp_path, max_pdu=max_pdu) as r:
        ds = make_image(rows=256, cols=256)
        raw = encode_dataset(ds)
        ok = c_store_pdus(raw, ds.SOPClassUID, ds.SOPInstanceUID, max_pdu=max_pdu)  # PDUs of exactly max_pdu
        assert max(len(p) - 6 for p in ok) == max_pdu
        pdus, _, _ = exchange(r.port, [assoc_rq(), *ok, RELEASE_RQ])
        assert dimse_statuses(pdus) == [0]
        ds2 = make_image(rows=256, cols=256)
        big = c_store_pdus(encode_dataset(ds2), ds2.SOPClassUID, ds2.SOPInstanceUID, max_pdu=max_pdu + 1)
        pdus, closed, _ = exchange(r.port, [assoc_rq(), *big, RELEASE_RQ])
        assert [t for t, _ in pdus] == [2, 7] and closed  # accepted, then aborted at the oversized PDU
        with r.sessions() as s:
            assert s.scalars(select(Instance.sop_instance_uid)).all() == [ds.SOPInstanceUID]


def test_unknown_pdu_type_is_aborted(tmp_path):
    with running_receiver(tmp_path) as r:
        pdus, closed, _ = exchange(r.port, b"\x09\x00\x00\x00\x00\x04abcd")
        assert [t for t, _ in pdus] == [7] and closed
        assert echo_ok(r.port)


# -- data set limits ---------------------------------------------------------------------------
def test_data_set_over_max_dataset_bytes_gets_a702_and_nothing_is_written(tmp_path):
    with running_receiver(tmp_path, max_dataset_bytes=100_000) as r:
        big, small = make_image(rows=300, cols=300), make_image()  # 180 kB of pixels vs 6 kB
        assert send_datasets(r.port, [big, small]) == [0xA702, 0]
        with r.sessions() as s:
            assert s.scalars(select(Instance.sop_instance_uid)).all() == [small.SOPInstanceUID]
        assert len(spool_files(r)) == 1  # only the small one; nothing half-written in tmp/
        ev = events(r, "store_rejected", wait_for=1)
        assert len(ev) == 1 and "0xA702" in ev[0].detail and "max_dataset_bytes" in ev[0].detail


def test_deflate_bomb_is_refused_with_a702(tmp_path):
    with running_receiver(tmp_path, max_inflated_bytes=1_000_000) as r:
        bomb = make_image(rows=1024, cols=1024, transfer_syntax=DeflatedExplicitVRLittleEndian)
        bomb.PixelData = b"\x00" * (1024 * 1024 * 2)  # 2 MB of zeros: deflates to ~2 kB
        fine = make_image(transfer_syntax=DeflatedExplicitVRLittleEndian)
        ae = scu_ae([DeflatedExplicitVRLittleEndian])
        assert send_datasets(r.port, [bomb, fine], ae=ae) == [0xA702, 0]
        ev = events(r, "store_rejected", wait_for=1)
        assert len(ev) == 1 and "max_inflated_bytes" in ev[0].detail


def test_inflate_never_produces_more_than_the_cap():
    from pacsbridge.dicom.metadata import RejectedDataset, _inflate

    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = c.compress(b"\x00" * 50_000_000) + c.flush()  # 50 MB in ~50 kB
    with pytest.raises(RejectedDataset) as exc:
        _inflate(bomb, 1_000_000)
    assert exc.value.status == 0xA702
    assert _inflate(bomb, 60_000_000) == b"\x00" * 50_000_000


def test_command_set_over_64_kib_aborts(tmp_path):
    with running_receiver(tmp_path) as r:
        # 20 command fragments of 4 kB that never end (no "last fragment" bit): 80 kB of command set
        frag = struct.pack(">L", 4001) + bytes([1, 0x01]) + b"\x00" * 3999
        pdata = b"\x04\x00" + struct.pack(">L", len(frag)) + frag
        pdus, closed, _ = exchange(r.port, [assoc_rq(), *[pdata] * 20])
        assert [t for t, _ in pdus][-1] == 7 and closed
        assert any("command set" in e.detail for e in events(r, "association_aborted", wait_for=1))


# -- association limits and AE titles ---------------------------------------------------------
def _associate(port: int, called: str = "PACSBRIDGE"):
    ae = scu_ae()
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_associations_per_peer_are_limited_with_the_standard_rejection(tmp_path):
    with running_receiver(tmp_path, max_associations_per_peer=2) as r:
        a1, a2 = _associate(r.port), _associate(r.port)
        assert a1.is_established and a2.is_established
        a3 = _associate(r.port)
        assert a3.is_rejected
        rj = a3.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
        a1.release()
        wait_until(lambda: r.scp.association_count() == 1, 5, "the released association to end on the receiver")
        a4 = _associate(r.port)
        assert a4.is_established
        a2.release()
        a4.release()
        reasons = [e.detail for e in events(r, "association_rejected", wait_for=1)]
        assert reasons == ["too many associations from 127.0.0.1 (max_associations_per_peer = 2)"]


def test_total_associations_are_limited(tmp_path):
    with running_receiver(tmp_path, max_associations=2, max_associations_per_peer=8) as r:
        a1, a2 = _associate(r.port), _associate(r.port)
        a3 = _associate(r.port)
        assert a1.is_established and a2.is_established and a3.is_rejected
        rj = a3.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        a1.release()
        a2.release()
        assert [e.detail for e in events(r, "association_rejected", wait_for=1)] == ["too many associations (max_associations = 2)"]


def test_connection_flood_beyond_twice_the_limits_is_closed_at_once(tmp_path):
    with running_receiver(tmp_path, max_associations=2, max_associations_per_peer=2) as r:
        socks = [socket.create_connection(("127.0.0.1", r.port)) for _ in range(10)]
        try:
            # at most 2 x per-peer limit (4) are kept waiting for an A-ASSOCIATE-RQ
            wait_until(lambda: sum(_closed_by_peer(s) for s in socks) >= 6, 5, "6 of the 10 connections closed")
        finally:
            for s in socks:
                s.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the receiver has closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_called_ae_title_is_checked_and_recorded(tmp_path):
    with running_receiver(tmp_path) as r:
        assoc = _associate(r.port, called="SOMEONE_ELSE")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)  # permanent, called AE unknown
        ev = events(r, "association_rejected", wait_for=1)
        assert len(ev) == 1 and "SOMEONE_ELSE" in ev[0].detail and "127.0.0.1" in ev[0].peer
    with running_receiver(tmp_path / "off", check_called_ae=False) as r:
        assoc = _associate(r.port, called="SOMEONE_ELSE")
        assert assoc.is_established
        assoc.release()


# -- silent peers -------------------------------------------------------------------------------
def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, socket.timeout):
        return None
    except OSError:
        pass
    return time.monotonic() - start


def test_silent_peers_are_dropped(tmp_path):
    with running_receiver(tmp_path, acse_timeout=1.0, network_timeout=1.0) as r:
        r.scp.limits.read_timeout = 1.0
        never_speaks = socket.create_connection(("127.0.0.1", r.port))
        stops_mid_pdu = socket.create_connection(("127.0.0.1", r.port))
        stops_mid_pdu.sendall(b"\x01\x00\x00\x00\x01\x00" + b"\x00" * 10)  # 10 of 256 bytes, then silence
        idle = _associate(r.port)
        assert idle.is_established
        results = {}

        def watch(name, s):  # noqa: ANN001
            results[name] = _closed_within(s, 10)

        threads = [threading.Thread(target=watch, args=a) for a in (("never", never_speaks), ("mid", stops_mid_pdu))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: not idle.is_established, 10, "the idle association to be aborted")
        assert results["never"] is not None and results["never"] < 5, results
        assert results["mid"] is not None and results["mid"] < 5, results
        assert not idle.is_established and idle.is_aborted  # idle association aborted after network_timeout
        assert echo_ok(r.port)


def test_a_slow_sender_within_the_timeout_is_not_dropped(tmp_path):
    """The read timeout is per read: a peer that keeps sending (slowly) is served."""
    with running_receiver(tmp_path, network_timeout=2.0) as r:
        ds = make_image()
        stream = b"".join([*c_store_pdus(encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID), RELEASE_RQ])
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.sendall(assoc_rq())
            assert read_one_pdu(s)[:1] == b"\x02"
            for i in range(0, len(stream), 2000):  # 1.2 s of pauses in all, each below the 2 s timeout
                s.sendall(stream[i:i + 2000])
                time.sleep(0.3)  # slow on purpose: the pauses are what this test sends
            pdus, _ = read_pdus(s, 5)
        assert dimse_statuses(pdus) == [0]


def test_instance_uid_is_fresh():  # guard for the helpers above: generated UIDs are unique
    assert generate_uid() != generate_uid()
    assert ComputedRadiographyImageStorage


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_p_data_before_the_association_is_accepted_is_aborted_cleanly(tmp_path):
    """Pipelining P-DATA behind the A-ASSOCIATE-RQ is a protocol violation pynetdicom's state machine
    raises on in its thread; the receiver aborts the association instead."""
    with running_receiver(tmp_path) as r:
        ds = make_image()
        stream = b"".join([assoc_rq(), *c_store_pdus(encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID)])
        pdus, closed, _ = exchange(r.port, stream)
        assert 7 in [t for t, _ in pdus] and closed
        assert 0 not in dimse_statuses(pdus)
        # The association's thread must have ended (raising, if it would) before the test does.
        wait_until(lambda: r.scp.association_count() == 0, 5, "the aborted association's thread to end")
        assert echo_ok(r.port)
        with r.sessions() as s:
            assert s.scalars(select(Instance)).all() == []
