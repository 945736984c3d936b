"""Users and API tokens.

A token is 32 random bytes from :mod:`secrets` (URL-safe text, prefixed ``pb_``); it is shown once
and only its SHA-256 is stored, so a copy of the database does not give access.  Revoking a user
revokes every token at once; ``issue_token`` adds a new one (old ones keep working until the user
is revoked).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..store.models import ApiToken, Event, Role, User, utcnow

log = logging.getLogger(__name__)

ROLES = tuple(r.value for r in Role)
TOKEN_PREFIX = "pb_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
#: ``last_used_at`` is written at most this often per token (not on every request).
LAST_USED_RESOLUTION = timedelta(minutes=1)


class AuthError(Exception):
    """A user operation was refused; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is calling the API (the authenticated user)."""

    user_id: int
    name: str
    role: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise AuthError(f"user name {name!r} is not valid: 1-64 letters, digits, '.', '_', '@' or '-', "
                        "starting with a letter or digit")
    return name


def create_user(session: Session, name: str, role: str, *, actor: str = "cli") -> tuple[User, str]:
    """A new user with one token; returns (user, token).  The token is not stored, only its hash."""
    check_name(name)
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise AuthError(f"user {name!r} already exists (use `pacsbridge users token {name}` for a new token)")
    user = User(name=name, role=role, created_at=utcnow())
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        raise AuthError(f"user {name!r} already exists") from None
    token = _add_token(session, user)
    session.add(Event(kind="user_created", actor=actor, detail=f"user {name} created with role {role}"))
    log.info("user %s created (role %s)", name, role)
    return user, token


def _add_token(session: Session, user: User) -> str:
    token = _new_token()
    session.add(ApiToken(user_id=user.id, token_sha256=hash_token(token), created_at=utcnow()))
    session.flush()
    return token


def _get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise AuthError(f"no user {name!r} (see `pacsbridge users list`)")
    return user


def issue_token(session: Session, name: str, *, actor: str = "cli") -> str:
    """A new token for an existing, active user."""
    user = _get_user(session, name)
    if user.revoked_at is not None:
        raise AuthError(f"user {name!r} is revoked; create a new user instead")
    token = _add_token(session, user)
    session.add(Event(kind="token_issued", actor=actor, detail=f"new token for user {name}"))
    log.info("new token for user %s", name)
    return token


def revoke_user(session: Session, name: str, *, actor: str = "cli") -> int:
    """Revoke the user and every token of it (they stop working at once); returns how many tokens."""
    user = _get_user(session, name)
    now = utcnow()
    if user.revoked_at is None:
        user.revoked_at = now
    n = session.execute(update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
                        .values(revoked_at=now)).rowcount
    session.add(Event(kind="user_revoked", actor=actor, detail=f"user {name} revoked ({n} tokens)"))
    log.info("user %s revoked (%d tokens)", name, n)
    return int(n or 0)


def list_users(session: Session) -> list[dict[str, Any]]:
    rows = []
    for user in session.scalars(select(User).order_by(User.name)):
        tokens = [t for t in user.tokens if t.revoked_at is None]
        used = [t.last_used_at for t in user.tokens if t.last_used_at is not None]
        rows.append({
            "name": user.name, "role": user.role, "active": user.revoked_at is None,
            "created_at": _iso(user.created_at), "revoked_at": _iso(user.revoked_at),
            "tokens": len(tokens), "last_used_at": _iso(max(used)) if used else None,
        })
    return rows


def authenticate(session: Session, token: str, now: datetime | None = None) -> Principal | None:
    """The user behind ``token``, or None when it is unknown, revoked, or its user is revoked."""
    if not token or len(token) > 200:
        return None
    row = session.execute(
        select(ApiToken, User).join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_sha256 == hash_token(token))
    ).one_or_none()
    if row is None:
        return None
    tok, user = row
    if tok.revoked_at is not None or user.revoked_at is not None:
        return None
    now = now or utcnow()
    last = tok.last_used_at
    if last is None or (now - (last if last.tzinfo else last.replace(tzinfo=now.tzinfo))) > LAST_USED_RESOLUTION:
        tok.last_used_at = now
        session.commit()
    return Principal(user.id, user.name, user.role)


def _iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    from ..worklist.lifecycle import as_utc

    return as_utc(dt).isoformat()
