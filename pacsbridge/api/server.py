"""Run the API with uvicorn in a background thread, as a component of ``pacsbridge serve``."""

from __future__ import annotations

import logging
import ssl
import threading
import time

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)


class HttpServer:
    """uvicorn in a thread; ``start()`` returns once the socket listens (or raises if it cannot)."""

    name = "http api"

    def __init__(self, app: FastAPI, host: str, port: int, start_timeout_s: float = 15.0, *,
                 tls_cert: str = "", tls_key: str = "", tls_min_version: str = "1.2") -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
            server_header=False, ssl_certfile=tls_cert or None, ssl_keyfile=tls_key or None,
            limit_concurrency=200, timeout_keep_alive=5,  # bounded connections; idle keep-alives closed
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
        log.info("HTTP API listening on %s://%s:%d", self.scheme, self.host, self.port)

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
