"""``users``: accounts for the HTTP API, the web page and DICOM UPS."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from .common import CommandError, command_settings, database_session

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def run(args: argparse.Namespace) -> int:
    from pacsbridge.auth.users import AuthError

    verbs = {"add": _add, "bind": _bind, "unbind": _bind, "token": _token, "revoke": _revoke, "list": _list}
    with database_session(command_settings(args), "write", "users") as session:
        try:
            verbs[args.users_command](args, session)
        except AuthError as exc:
            raise CommandError(str(exc)) from None
    return 0


def _add(args: argparse.Namespace, session: Session) -> None:
    from pacsbridge.auth.users import bind_ae, create_user

    user, token = create_user(session, args.name, args.role)
    for ae in args.ae_title or ():  # one transaction: no user left half made
        bind_ae(session, args.name, ae, tls_subject=args.tls_subject)
    session.commit()
    if args.json:
        out = {"name": user.name, "role": user.role, "token": token}
        if args.ae_title:
            out["ae_titles"] = [a.strip() for a in args.ae_title]
        print(json.dumps(out))
    else:
        bound = f", DICOM UPS as AE title {', '.join(a.strip() for a in args.ae_title)}" if args.ae_title else ""
        print(f"user {user.name} ({user.role}{bound}) created. API token (shown once, keep it secret):\n{token}")


def _bind(args: argparse.Namespace, session: Session) -> None:
    from pacsbridge.auth.users import bind_ae, unbind_ae

    if args.users_command == "bind":
        bind_ae(session, args.name, args.ae_title, tls_subject=args.tls_subject)
    else:
        unbind_ae(session, args.name, args.ae_title)
    session.commit()
    if args.json:
        print(json.dumps({"name": args.name, "ae_title": args.ae_title.strip(),
                          "bound": args.users_command == "bind"}))
    elif args.users_command == "bind":
        print(f"AE title {args.ae_title.strip()} now uses DICOM UPS as {args.name}"
              + (f" (only with TLS client certificate {args.tls_subject})" if args.tls_subject else ""))
    else:
        print(f"AE title {args.ae_title.strip()} unbound from {args.name}: its UPS requests are refused")


def _token(args: argparse.Namespace, session: Session) -> None:
    from pacsbridge.auth.users import issue_token

    token = issue_token(session, args.name)
    session.commit()
    if args.json:
        print(json.dumps({"name": args.name, "token": token}))
    else:
        print(f"new API token for {args.name} (shown once; older tokens keep working):\n{token}")


def _revoke(args: argparse.Namespace, session: Session) -> None:
    from pacsbridge.auth.users import revoke_user

    n = revoke_user(session, args.name)
    session.commit()
    print(json.dumps({"name": args.name, "revoked_tokens": n}) if args.json
          else f"user {args.name} revoked; {n} token(s) stop working now")


def _list(args: argparse.Namespace, session: Session) -> None:
    from pacsbridge.auth.users import list_users

    rows = list_users(session)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print("no users (create one: pacsbridge users add NAME --role admin)")
    else:
        for r in rows:
            state = "active" if r["active"] else f"revoked {r['revoked_at'][:19]}"
            aes = ",".join(b["ae_title"] + ("(tls)" if b["tls_subject"] else "") for b in r["ae_titles"])
            print(f"{r['name']:<20} {r['role']:<12} {state:<28} tokens {r['tokens']}  last used "
                  f"{(r['last_used_at'] or 'never')[:19]}" + (f"  AE {aes}" if aes else ""))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "users", help="accounts (HTTP API, DICOM UPS): add, list, revoke, token, bind, unbind",
        description="Accounts for the HTTP API, the web page and DICOM UPS. Roles: radiologist (works the "
        "worklist), admin (everything, incl. cancel, /docs), monitor (/metrics and /api/stats). A token is "
        "printed once; only its SHA-256 is stored. Revoking a user stops all its tokens (and its AE titles) "
        "at once. A reading station may use DICOM UPS only with a calling AE title bound to a user "
        "(--ae-title, `users bind`); it then acts as that user, with its role.",
    )
    from pacsbridge.store.models import Role

    us = p.add_subparsers(dest="users_command", required=True, metavar="{add,list,revoke,token,bind,unbind}")
    add = us.add_parser("add", help="create a user and print its first token")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=(Role.RADIOLOGIST.value, Role.ADMIN.value, Role.MONITOR.value))
    add.add_argument("--ae-title", action="append", metavar="AE",
                     help="a DICOM calling AE title that uses UPS as this user (repeatable)")
    add.add_argument("--tls-subject", metavar="SUBJECT",
                     help="with --ae-title: also require this mutual-TLS client certificate subject, "
                     "e.g. CN=READSTATION1,O=Hospital")
    add.add_argument("--json", action="store_true", help='print {"name", "role", "token"} (and "ae_titles")')
    for verb, text in (("bind", "let a DICOM calling AE title use UPS as this user"),
                       ("unbind", "stop a DICOM calling AE title acting as this user")):
        b = us.add_parser(verb, help=text)
        b.add_argument("name")
        b.add_argument("--ae-title", required=True, metavar="AE")
        if verb == "bind":
            b.add_argument("--tls-subject", metavar="SUBJECT",
                           help="require this mutual-TLS client certificate subject, e.g. CN=READSTATION1,O=Hospital")
        b.add_argument("--json", action="store_true")
    lst = us.add_parser("list", help="users, roles, state, token counts")
    lst.add_argument("--json", action="store_true")
    rev = us.add_parser("revoke", help="revoke a user and all its tokens")
    rev.add_argument("name")
    rev.add_argument("--json", action="store_true")
    tok = us.add_parser("token", help="print a new token for a user")
    tok.add_argument("name")
    tok.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
