"""Accounts and API tokens: users with a role, tokens stored as SHA-256 only (see :mod:`.users`)."""

from .users import (
    WORKLIST_ROLES, AuthError, Principal, authenticate, bind_ae, create_user, hash_token, issue_token, list_users,
    principal_for_ae, revoke_user, unbind_ae,
)

__all__ = ["WORKLIST_ROLES", "AuthError", "Principal", "authenticate", "bind_ae", "create_user", "hash_token",
           "issue_token", "list_users", "principal_for_ae", "revoke_user", "unbind_ae"]
