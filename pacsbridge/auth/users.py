"""Users, API tokens and the DICOM AE titles that act as users.

A token is 32 random bytes from :mod:`secrets` (URL-safe text, prefixed ``pb_``); it is shown once
and only its SHA-256 is stored, so a copy of the database does not give access.  Revoking a user
revokes every token at once; ``issue_token`` adds a new one (old ones keep working until the user
is revoked).

A reading station uses DICOM UPS as a user: ``bind_ae`` ties its calling AE title to one user (an AE
title to at most one user), optionally with the subject its mutual-TLS client certificate must carry;
``principal_for_ae`` is what the UPS SCP asks on every request, so unbinding or revoking works at once.
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

from ..store.models import ApiToken, Event, Role, User, UserAeBinding, utcnow

log = logging.getLogger(__name__)

ROLES = tuple(r.value for r in Role)
#: Who may read and work the worklist, over HTTP and DICOM UPS alike (monitor may not: patient data).
WORKLIST_ROLES = (Role.RADIOLOGIST.value, Role.ADMIN.value)
TOKEN_PREFIX = "pb_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_AE_RE = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")  # DICOM AE: no backslash/control
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
            "ae_titles": [{"ae_title": b.ae_title, "tls_subject": b.tls_subject}
                          for b in sorted(user.ae_bindings, key=lambda b: b.ae_title)],
        })
    return rows


# -- DICOM AE titles acting as users (UPS) ------------------------------------------------------------
def check_ae_title(ae_title: str) -> str:
    """The AE title as compared with a calling AE title (surrounding spaces are not significant)."""
    value = (ae_title or "").strip()
    if not _AE_RE.match(value):
        raise AuthError(f"AE title {ae_title!r} is not valid: 1-16 characters, no backslash or control characters")
    return value


def normalise_subject(subject: str) -> str:
    """``CN=X, O=Y`` -> ``CN=X,O=Y`` (attribute names upper case, spaces around separators dropped)."""
    parts = []
    for rdn in (subject or "").split(","):
        key, sep, value = rdn.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise AuthError(f"TLS subject {subject!r} is not 'ATTR=value,ATTR=value' (e.g. CN=READSTATION1,O=Hospital)")
        parts.append(f"{key.strip().upper()}={value.strip()}")
    return ",".join(parts)


def _same_subject(required: str, presented: str | None) -> bool:
    # The same attributes and values, in either order (RFC 4514 lists them most specific first, OpenSSL's
    # default output the other way round).
    if not presented:
        return False
    try:
        return sorted(normalise_subject(required).split(",")) == sorted(normalise_subject(presented).split(","))
    except AuthError:
        return False


def bind_ae(session: Session, name: str, ae_title: str, *, tls_subject: str | None = None,
            actor: str = "cli") -> UserAeBinding:
    """Let the calling AE title ``ae_title`` use DICOM UPS as user ``name`` (bound to nobody else)."""
    ae = check_ae_title(ae_title)
    subject = normalise_subject(tls_subject) if tls_subject else None
    user = _get_user(session, name)
    if user.revoked_at is not None:
        raise AuthError(f"user {name!r} is revoked; bind the AE title to an active user")
    existing = session.scalar(select(UserAeBinding).where(UserAeBinding.ae_title == ae))
    if existing is not None:
        holder = session.get(User, existing.user_id)
        raise AuthError(f"AE title {ae!r} is already bound to user {holder.name if holder else '?'!r} "
                        f"(`pacsbridge users unbind {holder.name if holder else 'NAME'} --ae-title {ae}` first)")
    binding = UserAeBinding(user_id=user.id, ae_title=ae, tls_subject=subject, created_at=utcnow())
    session.add(binding)
    try:
        session.flush()
    except IntegrityError:
        raise AuthError(f"AE title {ae!r} is already bound to a user") from None
    detail = f"AE title {ae} bound to user {name}" + (f" (TLS subject {subject})" if subject else "")
    session.add(Event(kind="ae_bound", actor=actor, detail=detail))
    log.info("%s", detail)
    return binding


def unbind_ae(session: Session, name: str, ae_title: str, *, actor: str = "cli") -> None:
    """Remove the binding of ``ae_title`` to user ``name``; that AE title may no longer use UPS."""
    ae = check_ae_title(ae_title)
    user = _get_user(session, name)
    binding = session.scalar(select(UserAeBinding).where(UserAeBinding.ae_title == ae,
                                                         UserAeBinding.user_id == user.id))
    if binding is None:
        raise AuthError(f"AE title {ae!r} is not bound to user {name!r} (see `pacsbridge users list`)")
    session.delete(binding)
    session.add(Event(kind="ae_unbound", actor=actor, detail=f"AE title {ae} unbound from user {name}"))
    log.info("AE title %s unbound from user %s", ae, name)


def principal_for_ae(session: Session, ae_title: str, tls_subject: str | None = None) -> tuple[Principal | None, str]:
    """The user a calling AE title acts as, or (None, why not).

    ``tls_subject``: the verified client certificate subject of the connection (None without mutual TLS);
    a binding that names a subject is refused unless the connection presented exactly that one."""
    ae = (ae_title or "").strip()
    row = session.execute(
        select(UserAeBinding, User).join(User, User.id == UserAeBinding.user_id).where(UserAeBinding.ae_title == ae)
    ).one_or_none() if ae else None
    if row is None:
        return None, f"calling AE title {ae!r} is not bound to a user"
    binding, user = row
    if user.revoked_at is not None:
        return None, f"calling AE title {ae!r} is bound to revoked user {user.name}"
    if binding.tls_subject and not _same_subject(binding.tls_subject, tls_subject):
        presented = f"subject {tls_subject}" if tls_subject else "no client certificate"
        return None, f"calling AE title {ae!r} needs the TLS client certificate {binding.tls_subject} ({presented})"
    return Principal(user.id, user.name, user.role), ""


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

    return dt.isoformat()
