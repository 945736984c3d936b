"""HTTP hardening: bind address, security headers, request body limits, HTTPS with a real uvicorn."""

from __future__ import annotations

import http.client
import shutil
import socket
import ssl

import pytest
from fastapi import FastAPI, Request

from dicom_support import free_port
from pacsbridge.api.security import SecurityMiddleware, install_security
from pacsbridge.config import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("PACSBRIDGE_"):
            monkeypatch.delenv(key)


def make_app(settings) -> FastAPI:  # noqa: ANN001
    app = FastAPI()

    @app.get("/api/thing")
    def thing() -> dict:
        return {"ok": True}

    @app.post("/api/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    @app.get("/page")
    def page() -> dict:
        return {"page": True}

    return install_security(app, settings)


def serve(app: FastAPI, **kw):  # noqa: ANN003, ANN201
    from pacsbridge.api.server import HttpServer

    server = HttpServer(app, "127.0.0.1", 0, **kw)
    server.start()
    return server


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            tls: ssl.SSLContext | None = None):  # noqa: ANN201
    conn = (http.client.HTTPSConnection("localhost", port, context=tls, timeout=10) if tls
            else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def test_defaults_bind_http_to_loopback_and_dicom_to_all():
    s = load_settings()
    assert s.http_host == "127.0.0.1" and s.dicom_host == "0.0.0.0"
    assert s.http_max_body_bytes == 1_048_576


def test_deprecated_bind_address_still_sets_both_unless_they_are_set():
    s = load_settings(bind_address="10.1.2.3")
    assert (s.dicom_host, s.http_host) == ("10.1.2.3", "10.1.2.3")
    s = load_settings(bind_address="10.1.2.3", http_host="127.0.0.1")
    assert (s.dicom_host, s.http_host) == ("10.1.2.3", "127.0.0.1")


def test_security_headers_and_no_store_on_a_real_server(tmp_path):
    server = serve(make_app(load_settings(data_dir=tmp_path)))
    try:
        resp, _ = request(server.port, "GET", "/api/thing")
        assert resp.status == 200
        assert "frame-ancestors 'none'" in resp.getheader("content-security-policy")
        assert "default-src 'self'" in resp.getheader("content-security-policy")
        assert resp.getheader("x-content-type-options") == "nosniff"
        assert resp.getheader("x-frame-options") == "DENY"
        assert resp.getheader("referrer-policy") == "no-referrer"
        assert resp.getheader("cache-control") == "no-store"
        assert resp.getheader("strict-transport-security") is None  # plain HTTP
        resp, _ = request(server.port, "GET", "/page")
        assert resp.getheader("x-frame-options") == "DENY" and resp.getheader("cache-control") is None
        resp, _ = request(server.port, "GET", "/nothing-here")
        assert resp.status == 404 and resp.getheader("x-content-type-options") == "nosniff"
    finally:
        server.stop()


def test_request_bodies_over_the_limit_get_413(tmp_path):
    server = serve(make_app(load_settings(data_dir=tmp_path, http_max_body_bytes=4096)))
    try:
        resp, data = request(server.port, "POST", "/api/echo", body=b"x" * 4096)
        assert resp.status == 200 and b'"size":4096' in data
        resp, data = request(server.port, "POST", "/api/echo", body=b"x" * 4097)
        assert resp.status == 413 and b"too large" in data
        assert resp.getheader("x-content-type-options") == "nosniff"
        # Chunked (no Content-Length): read up to the limit, then 413.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(10):
                    s.sendall(b"400\r\n" + b"y" * 1024 + b"\r\n")
                s.sendall(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                # The server answered 413 and closed once the limit was passed: the rest of the body
                # has nowhere to go. The answer is still in our receive queue.
                pass
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413")
        # A lying Content-Length larger than the limit is refused before anything is read.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000000\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 413")
    finally:
        server.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="OPENSSL COMMAND MISSING: HTTPS test SKIPPED")
def test_https_with_minimum_version(tmp_path):
    from hostile_support import make_pki

    pki = make_pki(tmp_path / "pki")
    settings = load_settings(data_dir=tmp_path, http_tls_cert=str(pki.server_cert), http_tls_key=str(pki.server_key),
                             tls_min_version="1.3")
    server = serve(make_app(settings), tls_cert=settings.http_tls_cert, tls_key=settings.http_tls_key,
                   tls_min_version=settings.tls_min_version)
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        resp, data = request(server.port, "GET", "/api/thing", tls=ctx)
        assert resp.status == 200 and b"ok" in data
        assert resp.getheader("strict-transport-security", "").startswith("max-age=")
        old = ssl.create_default_context(cafile=str(pki.ca))
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            request(server.port, "GET", "/api/thing", tls=old)
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            r, _ = request(server.port, "GET", "/api/thing")  # plain HTTP to the HTTPS port
            assert r.status == 400
            raise ConnectionError("answered plain HTTP with an error, as expected")
    finally:
        server.stop()


def test_middleware_keeps_a_header_the_route_set():
    import asyncio

    async def app(scope, receive, send):  # noqa: ANN001
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-frame-options", b"SAMEORIGIN")]})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def send(message):  # noqa: ANN001
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(SecurityMiddleware(app)({"type": "http", "method": "GET", "path": "/x", "headers": []}, receive, send))
    headers = dict(sent[0]["headers"])
    assert headers[b"x-frame-options"] == b"SAMEORIGIN" and headers[b"x-content-type-options"] == b"nosniff"


def test_daemon_wires_the_middleware_and_http_host(tmp_path):
    from pacsbridge.daemon import Daemon

    port = free_port()
    daemon = Daemon(load_settings(data_dir=tmp_path, http_port=port, worker_enabled=False, dicom_port=free_port()))
    daemon.prepare()
    components = daemon.pipeline_components()
    http = [c for c in components if c.name == "http api"][0]
    try:
        http.start()
        resp, _ = request(port, "GET", "/healthz")
        assert resp.status == 200 and resp.getheader("x-frame-options") == "DENY"
        assert http.host == "127.0.0.1"
    finally:
        http.stop()
        daemon.engine.dispose()
