"""Accounts and API tokens: users with a role, tokens stored as SHA-256 only (see :mod:`.users`)."""

from .users import (
    AuthError, Principal, authenticate, create_user, hash_token, issue_token, list_users, revoke_user,
)

__all__ = ["AuthError", "Principal", "authenticate", "create_user", "hash_token", "issue_token", "list_users",
           "revoke_user"]
