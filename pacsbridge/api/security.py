"""HTTP hardening, kept apart from the routes: security headers and a request body limit.

``install_security(app, settings)`` wraps the FastAPI app in :class:`SecurityMiddleware` (a plain
ASGI middleware, so it also covers responses the routes did not make, e.g. 404s and errors):

* headers on every response: Content-Security-Policy (scripts/styles/images from this origin only,
  no framing: ``frame-ancestors 'none'``), X-Content-Type-Options ``nosniff``, X-Frame-Options ``DENY``,
  Referrer-Policy ``no-referrer``, and Strict-Transport-Security when serving HTTPS;
  ``Cache-Control: no-store`` on ``/api/`` and ``/metrics`` (patient data and live state).  A header the
  route already set is kept.
* request bodies larger than ``http_max_body_bytes`` get 413 before the route runs: a declared
  Content-Length is checked first, and a body without one (chunked) is read up to the limit, never
  more, then handed to the route.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The one Content-Security-Policy: scripts, styles and fetches from this origin only (no inline ones),
#: images also from blob: URLs the page makes after an authenticated fetch; no plugins, no framing.
CSP = ("default-src 'self'; img-src 'self' blob:; object-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'none'")
NO_STORE_PREFIXES = ("/api/", "/metrics")


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int = 1_048_576, csp: str = CSP,
                 hsts: bool = False) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        headers = [
            (b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
        ]
        if hsts:
            headers.append((b"strict-transport-security", b"max-age=31536000"))
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(self.headers)
        if scope.get("path", "").startswith(NO_STORE_PREFIXES):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in extra if k not in present)]}
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _too_large(send_with_headers, self.max_body_bytes)
            return
        if declared == 0 or scope.get("method") in ("GET", "HEAD", "OPTIONS") and declared is None \
                and not _chunked(scope):
            await self.app(scope, receive, send_with_headers)
            return
        # Read the body (bounded), then replay it to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                await _too_large(send_with_headers, self.max_body_bytes)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_headers)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _chunked(scope: Scope) -> bool:
    return b"chunked" in (_header(scope, b"transfer-encoding") or b"").lower()


async def _too_large(send: Send, limit: int) -> None:
    body = b'{"detail":"request body too large (limit %d bytes)"}' % limit
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def install_security(app: Any, settings: Any, *, csp: str = CSP) -> Any:  # noqa: ANN401
    """Wrap ``app`` (FastAPI/Starlette) with :class:`SecurityMiddleware` configured from ``settings``
    (``http_max_body_bytes``, HTTPS when ``http_tls_cert``); returns ``app`` for chaining."""
    app.add_middleware(SecurityMiddleware, max_body_bytes=settings.http_max_body_bytes, csp=csp,
                       hsts=bool(getattr(settings, "http_tls_cert", "")))
    return app
