"""Run the API with uvicorn in a background thread, as a component of ``pacsbridge serve``.

Connections are bounded by :class:`HttpLimits`, enforced by :func:`guarded_protocol`, a small subclass of
uvicorn's h11 protocol (uvicorn itself only has ``limit_concurrency``, which counts idle connections too,
so 200 idle sockets made every request answer 503):

* open connections: at most ``max_connections`` in all and ``max_connections_per_peer`` from one IP
  address; a connection beyond either is closed at once, before anything is read from it;
* a request's headers must be complete within ``header_timeout_s`` of the connection opening (or of the
  first byte after a response on a kept-alive connection), its body within ``body_timeout_s`` of the
  headers; otherwise the connection is closed (logged at WARNING with the address, at most once a
  second);
* an idle kept-alive connection is closed after ``keep_alive_s`` (uvicorn's ``timeout_keep_alive``);
  headers larger than h11's 16 KiB are refused (400), bodies larger than ``http_max_body_bytes`` with
  413 (:mod:`.security`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """Connection limits of the HTTP server (config keys ``http_*``)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 400
    max_connections_per_peer: int = 50
    keep_alive_s: float = 5.0


class ConnectionGuard:
    """Counts open connections per address (one per server; used only from the server's event loop)."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.per_peer: Counter[str] = Counter()
        self.total = 0
        self._last_warning = 0.0
        self._suppressed = 0

    def admit(self, address: str) -> bool:
        if self.total >= self.limits.max_connections:
            self.warn("HTTP connection from %s closed: %d connections open (http_max_connections)", address,
                      self.total)
            return False
        if self.per_peer[address] >= self.limits.max_connections_per_peer:
            self.warn("HTTP connection from %s closed: %d connections open from this address "
                      "(http_max_connections_per_peer)", address, self.per_peer[address])
            return False
        self.total += 1
        self.per_peer[address] += 1
        return True

    def release(self, address: str) -> None:
        self.total -= 1
        self.per_peer[address] -= 1
        if self.per_peer[address] <= 0:
            del self.per_peer[address]

    def warn(self, message: str, *args: Any) -> None:  # noqa: ANN401
        now = time.monotonic()
        if now - self._last_warning < 1.0:  # a flood must not flood the log too
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} more like it not logged)" if self._suppressed else ""
        self._last_warning, self._suppressed = now, 0
        log.warning(message + suffix, *args)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the connection caps and request deadlines of ``pb_guard`` (a class
    attribute: uvicorn builds one protocol object per connection from the class alone)."""

    pb_guard: ConnectionGuard
    _pb_admitted = False
    _pb_timer: asyncio.TimerHandle | None = None
    _pb_waiting_for = ""  # "headers" | "body" while a deadline runs

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._pb_address = str(peer[0]) if peer else "?"
        if not self.pb_guard.admit(self._pb_address):
            transport.abort()  # nothing read, nothing allocated for it
            return
        self._pb_admitted = True
        super().connection_made(transport)
        self._pb_arm("headers", self.pb_guard.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._pb_admitted:
            return
        self._pb_admitted = False
        self._pb_cancel()
        self.pb_guard.release(self._pb_address)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._pb_admitted:
            return
        super().data_received(data)
        limits = self.pb_guard.limits
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            if self._pb_timer is None:  # the start of a next request on a kept-alive connection
                self._pb_arm("headers", limits.header_timeout_s)
        elif cycle.more_body:
            if self._pb_waiting_for != "body":
                self._pb_arm("body", limits.body_timeout_s)
        else:
            self._pb_cancel()  # the whole request is in: the route runs (its own time is not bounded here)

    def on_response_complete(self) -> None:
        self._pb_cancel()  # uvicorn's keep-alive timer takes over
        super().on_response_complete()

    def _pb_arm(self, what: str, seconds: float) -> None:
        self._pb_cancel()
        self._pb_waiting_for = what
        self._pb_timer = self.loop.call_later(seconds, self._pb_expired, what, seconds)

    def _pb_cancel(self) -> None:
        if self._pb_timer is not None:
            self._pb_timer.cancel()
        self._pb_timer, self._pb_waiting_for = None, ""

    def _pb_expired(self, what: str, seconds: float) -> None:
        self._pb_timer, self._pb_waiting_for = None, ""
        if self.transport is not None and not self.transport.is_closing():
            self.pb_guard.warn("HTTP connection from %s closed: request %s not received within %g s",
                               self._pb_address, what, seconds)
            self.transport.close()  # a route waiting for the body sees a disconnect


def guarded_protocol(guard: ConnectionGuard) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the connection caps and request deadlines of ``guard``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"pb_guard": guard})


class HttpServer:
    """uvicorn in a thread; ``start()`` returns once the socket listens (or raises if it cannot)."""

    name = "http api"

    def __init__(self, app: FastAPI, host: str, port: int, start_timeout_s: float = 15.0, *,
                 tls_cert: str = "", tls_key: str = "", tls_min_version: str = "1.2",
                 limits: HttpLimits | None = None) -> None:
        self.limits = limits or HttpLimits()
        self.guard = ConnectionGuard(self.limits)
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            log_config=None,  # uvicorn's lines go through our handlers (and log_format), not its own
            server_header=False, ssl_certfile=tls_cert or None, ssl_keyfile=tls_key or None,
            http=guarded_protocol(self.guard),
            # Connections are capped by the guard; uvicorn's own cap would count idle sockets and answer 503.
            limit_concurrency=None, timeout_keep_alive=int(max(1, round(self.limits.keep_alive_s))),
        )
        if tls_cert:
            config.load()  # builds config.ssl, whose minimum version uvicorn does not expose
            assert config.ssl is not None
            config.ssl.minimum_version = (ssl.TLSVersion.TLSv1_3 if tls_min_version == "1.3"
                                          else ssl.TLSVersion.TLSv1_2)
        self.scheme = "https" if tls_cert else "http"
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._timeout = start_timeout_s
        self.host, self.port = host, port

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, name="http-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"HTTP server could not listen on {self.host}:{self.port} (see the log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server did not start within {self._timeout} s")
            time.sleep(0.02)
        if self.port == 0:  # ephemeral port (tests): report the real one
            self.port = self._server.servers[0].sockets[0].getsockname()[1]
        log.info("HTTP API listening on %s://%s:%d (at most %d connections, %d per address; request headers "
                 "within %g s, body within %g s)", self.scheme, self.host, self.port, self.limits.max_connections,
                 self.limits.max_connections_per_peer, self.limits.header_timeout_s, self.limits.body_timeout_s)

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None


def http_limits_from_settings(settings: Any) -> HttpLimits:  # noqa: ANN401 - pacsbridge.config.Settings
    return HttpLimits(
        header_timeout_s=settings.http_header_timeout_s, body_timeout_s=settings.http_body_timeout_s,
        max_connections=settings.http_max_connections, max_connections_per_peer=settings.http_max_connections_per_peer,
        keep_alive_s=settings.http_keep_alive_s,
    )
