"""HTTP connection limits against the real server (uvicorn in its thread, as ``pacsbridge serve`` runs it):
idle and slow clients cannot starve the API.  Raw loopback sockets from several source addresses
(127.0.0.2..) and ``http.client`` as the normal client."""

from __future__ import annotations

import http.client
import logging
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_until

from pacsbridge.api.app import create_app
from pacsbridge.api.security import install_security
from pacsbridge.api.server import HttpLimits, HttpServer
from pacsbridge.config import load_settings
from pacsbridge.store import migrations
from pacsbridge.store.db import make_engine, make_sessionmaker

HEADER_S, BODY_S = 2.0, 1.5
IDLE_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 6)]  # 4 x 50 = 200 idle sockets


@pytest.fixture
def server(tmp_path: Path) -> Iterator[HttpServer]:
    engine = make_engine(f"sqlite:///{tmp_path / 'http.db'}")
    migrations.upgrade(engine)
    app = install_security(create_app(make_sessionmaker(engine)), load_settings(data_dir=tmp_path))
    srv = HttpServer(app, "127.0.0.1", 0, limits=HttpLimits(header_timeout_s=HEADER_S, body_timeout_s=BODY_S,
                                                             max_connections=400, max_connections_per_peer=50))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        engine.dispose()


def connect_from(address: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((address, 0))
    s.connect(("127.0.0.1", port))
    return s


def healthz(port: int, source: str = "127.0.0.1") -> tuple[int, float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status, time.monotonic() - started
    finally:
        conn.close()


def closed_by_server(socks: list[socket.socket], within: float) -> list[float | None]:
    """For each socket: seconds until the server closed it (None: still open after ``within``)."""
    started = time.monotonic()
    result: list[float | None] = [None] * len(socks)
    while time.monotonic() - started < within and any(r is None for r in result):
        open_socks = [s for s, r in zip(socks, result) if r is None]
        readable, _, _ = select.select(open_socks, [], [], 0.1)
        for s in readable:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                result[socks.index(s)] = time.monotonic() - started
    return result


def test_200_idle_sockets_do_not_starve_healthz_and_are_closed_after_the_header_deadline(server, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pacsbridge.api.server"):
        idle = [connect_from(a, server.port) for a in IDLE_ADDRESSES for _ in range(50)]
        opened = time.monotonic()
        try:
            for _ in range(5):  # while every idle socket is open
                status, took = healthz(server.port)
                assert status == 200 and took < 1.0, (status, took)
            assert time.monotonic() - opened < HEADER_S, "the checks above should run while the idle sockets are open"
            assert server.guard.total >= 200
            closed = closed_by_server(idle, HEADER_S + 5)
        finally:
            for s in idle:
                s.close()
    elapsed = [t for t in closed if t is not None]
    assert len(elapsed) == 200, f"{closed.count(None)} idle sockets still open"
    assert max(elapsed) < HEADER_S + 2
    assert any("request headers not received within 2 s" in r.getMessage() and "127.0.0." in r.getMessage()
               for r in caplog.records)
    wait_until(lambda: server.guard.total == 0 and not server.guard.per_peer, 5,  # every slot came back
               lambda: f"every connection slot back ({server.guard.total} still counted)")
    assert healthz(server.port)[0] == 200


def test_connections_beyond_the_per_address_cap_are_closed_at_once(server) -> None:
    mine = [connect_from("127.0.0.7", server.port) for _ in range(50)]
    try:
        extra = connect_from("127.0.0.7", server.port)
        assert closed_by_server([extra], 1.0)[0] is not None  # the 51st from this address
        extra.close()
        status, took = healthz(server.port, source="127.0.0.8")  # another address is served
        assert status == 200 and took < 1.0
    finally:
        for s in mine:
            s.close()


def test_headers_trickled_byte_by_byte_are_cut_at_the_deadline(server) -> None:
    s = connect_from("127.0.0.9", server.port)
    try:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        got = b""
        while time.monotonic() - started < HEADER_S + 5:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # each within any per-read timeout
            except OSError:
                break
            readable, _, _ = select.select([s], [], [], 0.3)
            if readable:
                chunk = s.recv(65536)
                got += chunk
                if not chunk:
                    break
        took = time.monotonic() - started
    finally:
        s.close()
    assert took < HEADER_S + 1.5 and b"200 OK" not in got


def test_a_body_that_stops_is_cut_at_the_body_deadline_and_a_prompt_one_is_served(server) -> None:
    s = connect_from("127.0.0.10", server.port)
    try:
        s.sendall(b"POST /api/worklist/1/complete HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"finding\":")
        (closed,) = closed_by_server([s], BODY_S + 5)
    finally:
        s.close()
    assert closed is not None and BODY_S - 0.5 <= closed < BODY_S + 2, closed
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("POST", "/api/worklist/1/complete", body=b'{"finding": "pneumonia"}',
                     headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 401  # read in full, then refused for want of a token
    finally:
        conn.close()


def test_kept_alive_connection_serves_several_requests_then_idles_out(server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(3):
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
        sock = conn.sock
        assert sock is not None
        (closed,) = closed_by_server([sock], 10)
        assert closed is not None and closed < server.limits.keep_alive_s + 2
    finally:
        conn.close()


def test_limits_come_from_the_configuration(tmp_path: Path, monkeypatch) -> None:
    """The keys in pacsbridge.example.toml / PACSBRIDGE_* reach the HTTP server and the DICOM transport."""
    from pacsbridge.api.server import http_limits_from_settings
    from pacsbridge.dicom.storage_scp import storage_scp_from_settings

    monkeypatch.setenv("PACSBRIDGE_HTTP_HEADER_TIMEOUT_S", "3.5")
    monkeypatch.setenv("PACSBRIDGE_PDU_DEADLINE_FLOOR_S", "7")
    settings = load_settings(data_dir=tmp_path, http_max_connections_per_peer=9, pdu_deadline_per_mib_s=2.5)
    limits = http_limits_from_settings(settings)
    assert (limits.header_timeout_s, limits.body_timeout_s, limits.max_connections,
            limits.max_connections_per_peer, limits.keep_alive_s) == (3.5, 30.0, 400, 9, 5.0)
    engine = make_engine(f"sqlite:///{tmp_path / 'cfg.db'}")
    scp = storage_scp_from_settings(settings, make_sessionmaker(engine))
    assert (scp.limits.pdu_deadline_floor, scp.limits.pdu_deadline_per_mib) == (7.0, 2.5)
    engine.dispose()
