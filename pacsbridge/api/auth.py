"""FastAPI dependencies for Bearer-token authentication and roles.

``Authorization: Bearer <token>``: a missing, unknown or revoked token is 401 (with
``WWW-Authenticate: Bearer``); a valid token whose role may not use the route is 403.  The token is
checked against the database on every request, so revocation works at once.
"""

from __future__ import annotations

from typing import Callable

from fastapi import Depends, HTTPException, Request

from ..auth.users import WORKLIST_ROLES, Principal, authenticate
from ..store.models import Role

ADMIN, RADIOLOGIST, MONITOR = Role.ADMIN.value, Role.RADIOLOGIST.value, Role.MONITOR.value
#: Who may do what (admin may do everything).
READERS = WORKLIST_ROLES  # the same roles DICOM UPS requires
ANYONE = (MONITOR, RADIOLOGIST, ADMIN)


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


def principal(request: Request) -> Principal:
    """The caller named by the Bearer token (401 when there is none or it is not valid)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise _unauthorized("missing Authorization: Bearer <token> header")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("Authorization header must be 'Bearer <token>'")
    with request.app.state.sessions() as session:
        who = authenticate(session, token.strip())
    if who is None:
        raise _unauthorized("invalid or revoked token")
    request.state.principal = who
    return who


def require(*roles: str) -> Callable[..., Principal]:
    """A dependency that returns the caller when its role is one of ``roles``, else 403."""

    def check(who: Principal = Depends(principal)) -> Principal:
        if who.role not in roles:
            raise HTTPException(403, f"role {who.role} may not do this (needs {' or '.join(roles)})")
        return who

    return check


admin = require(ADMIN)
reader = require(*READERS)
anyone = require(*ANYONE)
watcher = require(MONITOR, ADMIN)
