"""Client errors are the usual answer and one log line (no traceback, no query string)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..worklist import lifecycle as lc

log = logging.getLogger("pacsbridge.api.app")


#: The HTTP status of each refusal of the life cycle, most specific first; any other refusal is 409
#: (illegal transition, someone else's claim, wrong Transaction UID, expired claim, no finding).
HTTP_STATUS_OF_REFUSAL: tuple[tuple[type[lc.LifecycleError], int], ...] = (
    (lc.ItemNotFound, 404), (lc.InvalidValue, 422), (lc.NotPermitted, 403))


def status_of(exc: lc.LifecycleError) -> int:
    return next((code for cls, code in HTTP_STATUS_OF_REFUSAL if isinstance(exc, cls)), 409)


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    where = "; ".join(".".join(str(p) for p in e.get("loc", ())) + ": " + str(e.get("msg", ""))
                      for e in exc.errors()[:3])
    log.info("client error 422 %s %s: %s", request.method, request.url.path, where[:300])
    return await request_validation_exception_handler(request, exc)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code < 500:
        log.info("client error %d %s %s: %s", exc.status_code, request.method, request.url.path, str(exc.detail)[:300])
    else:
        log.warning("error %d %s %s: %s", exc.status_code, request.method, request.url.path, str(exc.detail)[:300])
    return await http_exception_handler(request, exc)


def lifecycle_error(request: Request, exc: lc.LifecycleError) -> JSONResponse:
    log.info("client error %d %s %s: %s", status_of(exc), request.method, request.url.path, str(exc)[:300])
    body: dict[str, Any] = {"detail": str(exc), "current": exc.current}
    holder = getattr(exc, "holder", None)
    if holder is not None:
        body["holder"] = holder
    return JSONResponse(body, status_code=status_of(exc))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(lc.LifecycleError, lifecycle_error)
