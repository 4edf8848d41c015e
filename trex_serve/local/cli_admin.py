"""CLI operator commands: thin clients of the running gateway's ``/admin/v1`` API.

``trex-serve accounts create --name Acme --plan free`` and friends call
``http://127.0.0.1:$TREX_HTTP_PORT`` (or ``$TREX_ADMIN_URL``) with ``Authorization: Bearer
$TREX_ADMIN_TOKEN`` and print the JSON answer. Exit codes: 0 success, 1 the API refused (its error
envelope is printed on stderr), 2 the gateway could not be reached or the arguments are invalid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def _base_url(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return args.url.rstrip("/")
    if os.environ.get("TREX_ADMIN_URL"):
        return os.environ["TREX_ADMIN_URL"].rstrip("/")
    return f"http://127.0.0.1:{os.environ.get('TREX_HTTP_PORT') or '8000'}"


def request(args: argparse.Namespace, method: str, path: str, body: Any = None,
            query: dict[str, Any] | None = None) -> int:
    """Call the admin API and print the JSON answer; returns the process exit code."""
    url = _base_url(args) + "/admin/v1" + path
    if query:
        params = {k: v for k, v in query.items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
    token = getattr(args, "token", None) or os.environ.get("TREX_ADMIN_TOKEN", "")
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Accept", "application/json")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=getattr(args, "timeout", 30)) as resp:
            payload = resp.read()
        _print(payload, sys.stdout)
        return 0
    except urllib.error.HTTPError as exc:
        _print(exc.read(), sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"error: cannot reach the gateway at {_base_url(args)}: {reason}", file=sys.stderr)
        return 2


def _print(payload: bytes, stream: Any) -> None:
    try:
        print(json.dumps(json.loads(payload or b"null"), indent=2, ensure_ascii=False), file=stream)
    except ValueError:
        print(payload.decode("utf-8", "replace"), file=stream)


def _json_arg(text: str) -> Any:
    """A JSON value; ``null`` clears a setting. ``@file.json`` reads a file."""
    try:
        if text.startswith("@"):
            with open(text[1:], encoding="utf-8") as fh:
                return json.load(fh)
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None


def _bool_arg(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("expected true or false")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


_UNSET: Any = object()  # an option not given (a JSON ``null`` clears a setting)


def _limits(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.limits is not _UNSET:
        return args.limits
    limits = {name: getattr(args, name) for name in ("rpm", "tpm", "concurrency")
              if getattr(args, name) is not None}
    return limits or None


def _set(body: dict[str, Any], name: str, value: Any) -> None:
    if value is not None:
        body[name] = value


# ----------------------------------------------------------------------------- handlers


def _accounts_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    _set(body, "plan", args.plan)
    _set(body, "subscription_state", args.subscription_state)
    if args.risk is not _UNSET:
        body["risk"] = args.risk
    return request(args, "POST", "/accounts", body)


def _accounts_list(args: argparse.Namespace) -> int:
    return request(args, "GET", "/accounts")


def _accounts_show(args: argparse.Namespace) -> int:
    return request(args, "GET", f"/accounts/{args.account_id}")


def _accounts_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    for name in ("name", "state", "subscription_state", "plan", "log_content"):
        _set(body, name, getattr(args, name))
    if args.risk is not _UNSET or args.clear_risk:
        body["risk"] = None if args.clear_risk else args.risk
    if args.grace_until is not None:
        body["grace_until"] = None if args.grace_until.lower() in ("", "none", "null") else args.grace_until
    if not body:
        print("error: nothing to update (see --help)", file=sys.stderr)
        return 2
    return request(args, "PATCH", f"/accounts/{args.account_id}", body)


def _accounts_usage(args: argparse.Namespace) -> int:
    return request(args, "GET", f"/accounts/{args.account_id}/usage")


def _accounts_logs(args: argparse.Namespace) -> int:
    query = {"limit": args.limit, "before": args.before, "status": args.status, "model": args.model,
             "key_id": args.key_id, "since": args.since}
    return request(args, "GET", f"/accounts/{args.account_id}/logs", query=query)


def _accounts_risk_events(args: argparse.Namespace) -> int:
    return request(args, "GET", f"/accounts/{args.account_id}/risk-events", query={"limit": args.limit})


def _keys_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    _set(body, "name", args.name)
    _set(body, "limits", _limits(args))
    _set(body, "models", args.models)
    _set(body, "expires_at", args.expires_at)
    if args.risk is not _UNSET:
        body["risk"] = args.risk
    _set(body, "billing_policy", args.billing_policy)
    _set(body, "cache_ttl_s", args.cache_ttl)
    return request(args, "POST", f"/accounts/{args.account_id}/keys", body)


def _keys_list(args: argparse.Namespace) -> int:
    return request(args, "GET", f"/accounts/{args.account_id}/keys")


def _keys_update(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    _set(body, "name", args.name)
    _set(body, "state", args.state)
    _set(body, "billing_policy", args.billing_policy)
    _set(body, "cache_ttl_s", args.cache_ttl)
    _set(body, "expires_at", args.expires_at)
    limits = _limits(args)
    if limits is not None or args.limits is not _UNSET:
        body["limits"] = limits
    if args.models is not None:
        body["models"] = None if args.models == ["*"] else args.models
    if args.risk is not _UNSET or args.clear_risk:
        body["risk"] = None if args.clear_risk else args.risk
    if not body:
        print("error: nothing to update (see --help)", file=sys.stderr)
        return 2
    return request(args, "PATCH", f"/keys/{args.key_id}", body)


def _keys_revoke(args: argparse.Namespace) -> int:
    return request(args, "PATCH", f"/keys/{args.key_id}", {"state": "revoked"})


def _bindings_set(args: argparse.Namespace) -> int:
    api_key = args.api_key
    if api_key is None and args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
    if api_key == "-" or api_key is None:
        api_key = sys.stdin.readline().strip()
    if not api_key:
        print("error: no provider API key given (--api-key, --api-key-env or stdin)", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"api_key": api_key}
    _set(body, "key_ids", args.key_ids)
    return request(args, "PUT", f"/accounts/{args.account_id}/bindings/{args.provider}", body)


def _bindings_list(args: argparse.Namespace) -> int:
    return request(args, "GET", f"/accounts/{args.account_id}/bindings")


def _bindings_delete(args: argparse.Namespace) -> int:
    return request(args, "DELETE", f"/accounts/{args.account_id}/bindings/{args.provider}")


def _credits_grant(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"amount": args.amount}
    _set(body, "reason", args.reason)
    return request(args, "POST", f"/accounts/{args.account_id}/credits", body)


def _audit(args: argparse.Namespace) -> int:
    return request(args, "GET", "/audit", query={"limit": args.limit, "account_id": args.account_id})


def _upstream_keys_list(args: argparse.Namespace) -> int:
    return request(args, "GET", "/upstream-keys")


def _upstream_keys_reinstate(args: argparse.Namespace) -> int:
    return request(args, "POST", f"/upstream-keys/{args.provider}/{args.key_id}/reinstate")


# ----------------------------------------------------------------------------- parser


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--url", help="gateway base URL (default http://127.0.0.1:$TREX_HTTP_PORT)")
    parser.add_argument("--token", help="operator token (default $TREX_ADMIN_TOKEN)")
    parser.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    return parser


def _leaf(sub: Any, name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
    parser = _common(sub.add_parser(name, help=help_text, description=help_text))
    parser.set_defaults(func=func, fn=func)
    return parser


def _limit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute")
    parser.add_argument("--concurrency", type=int, help="concurrent requests")
    parser.add_argument("--limits", type=_json_arg, default=_UNSET,
                        help="limits as JSON (replaces --rpm/--tpm/--concurrency; 'null' clears)")


def register(subparsers: Any) -> None:
    """Add ``accounts``, ``keys``, ``bindings``, ``credits`` and ``audit`` to a CLI's subparsers.
    Every leaf sets ``func`` and ``fn`` (the same ``handler(args) -> int``, the exit code)."""
    states = ["trialing", "active", "past_due", "canceled"]

    accounts = subparsers.add_parser("accounts", help="manage accounts (operator API)")
    acc_sub = accounts.add_subparsers(dest="accounts_command", metavar="{create,list,show,update,usage,logs}")
    acc_sub.required = True
    p = _leaf(acc_sub, "create", _accounts_create, "create an account (prints its id and owner token)")
    p.add_argument("--name", required=True)
    p.add_argument("--plan", help="plan name from the catalog (default: free)")
    p.add_argument("--subscription-state", choices=states)
    p.add_argument("--risk", type=_json_arg, default=_UNSET, help="risk settings as JSON")
    _leaf(acc_sub, "list", _accounts_list, "list accounts")
    p = _leaf(acc_sub, "show", _accounts_show, "show one account")
    p.add_argument("account_id")
    p = _leaf(acc_sub, "update", _accounts_update, "change an account's state, subscription, plan or risk")
    p.add_argument("account_id")
    p.add_argument("--name")
    p.add_argument("--state", choices=["active", "suspended"])
    p.add_argument("--subscription-state", choices=states)
    p.add_argument("--plan")
    p.add_argument("--grace-until", help="ISO 8601 time past_due stays served until ('none' clears)")
    p.add_argument("--log-content", type=_bool_arg, help="store prompt/completion text (true/false)")
    p.add_argument("--risk", type=_json_arg, default=_UNSET,
                   help="risk settings as JSON (replaces the current ones)")
    p.add_argument("--clear-risk", action="store_true", help="remove the account's risk settings")
    p = _leaf(acc_sub, "usage", _accounts_usage, "quota and credits of an account")
    p.add_argument("account_id")
    p = _leaf(acc_sub, "logs", _accounts_logs, "newest request logs of an account")
    p.add_argument("account_id")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--before", help="a request_id (next page) or an ISO timestamp")
    p.add_argument("--since", help="ISO timestamp")
    p.add_argument("--status", help="status code, 4xx/5xx, ok or error")
    p.add_argument("--model")
    p.add_argument("--key-id")
    p = _leaf(acc_sub, "risk-events", _accounts_risk_events, "risk events of an account")
    p.add_argument("account_id")
    p.add_argument("--limit", type=int, default=50)

    keys = subparsers.add_parser("keys", help="manage API keys (operator API)")
    key_sub = keys.add_subparsers(dest="keys_command", metavar="{create,list,update,revoke}")
    key_sub.required = True
    p = _leaf(key_sub, "create", _keys_create, "create an API key (the key is printed once)")
    p.add_argument("account_id")
    p.add_argument("--name")
    _limit_args(p)
    p.add_argument("--models", type=_csv, help="comma-separated allow-list of model ids")
    p.add_argument("--expires-at", help="ISO 8601 expiry")
    p.add_argument("--risk", type=_json_arg, default=_UNSET, help="risk settings as JSON")
    p.add_argument("--billing-policy", choices=["reject", "downgrade"])
    p.add_argument("--cache-ttl", type=int, help="response cache default for this key's requests, seconds")
    p = _leaf(key_sub, "list", _keys_list, "list an account's keys (no secrets)")
    p.add_argument("account_id")
    p = _leaf(key_sub, "update", _keys_update,
              "change a key (limits and risk given replace the current ones; 'null' JSON clears)")
    p.add_argument("key_id")
    p.add_argument("--name")
    p.add_argument("--state", choices=["active", "inactive", "suspended", "revoked"])
    _limit_args(p)
    p.add_argument("--models", type=_csv, help="comma-separated allow-list ('*' allows all)")
    p.add_argument("--expires-at", help="ISO 8601 expiry")
    p.add_argument("--risk", type=_json_arg, default=_UNSET, help="risk settings as JSON")
    p.add_argument("--clear-risk", action="store_true")
    p.add_argument("--billing-policy", choices=["reject", "downgrade"])
    p.add_argument("--cache-ttl", type=int, help="response cache default, seconds (0: off)")
    p = _leaf(key_sub, "revoke", _keys_revoke, "revoke a key (final)")
    p.add_argument("key_id")

    bindings = subparsers.add_parser("bindings", help="provider keys of an account (operator API)")
    bind_sub = bindings.add_subparsers(dest="bindings_command", metavar="{set,list,delete}")
    bind_sub.required = True
    p = _leaf(bind_sub, "set", _bindings_set, "bind (or replace) a provider API key for an account")
    p.add_argument("account_id")
    p.add_argument("provider")
    p.add_argument("--api-key", help="the provider key ('-' or omitted: read from stdin)")
    p.add_argument("--api-key-env", help="read the provider key from this environment variable")
    p.add_argument("--key-ids", type=_csv, help="comma-separated key ids (default: all keys)")
    p = _leaf(bind_sub, "list", _bindings_list, "list bindings (masked)")
    p.add_argument("account_id")
    p = _leaf(bind_sub, "delete", _bindings_delete, "remove a binding")
    p.add_argument("account_id")
    p.add_argument("provider")

    credits_p = subparsers.add_parser("credits", help="Compute Credits (operator API)")
    cred_sub = credits_p.add_subparsers(dest="credits_command", metavar="{grant}")
    cred_sub.required = True
    p = _leaf(cred_sub, "grant", _credits_grant, "grant Compute Credits to an account")
    p.add_argument("account_id")
    p.add_argument("amount", type=float, help="credits (> 0)")
    p.add_argument("--reason")

    upstream = subparsers.add_parser("upstream-keys", help="managed provider keys (operator API)")
    up_sub = upstream.add_subparsers(dest="upstream_keys_command", metavar="{list,reinstate}")
    up_sub.required = True
    _leaf(up_sub, "list", _upstream_keys_list, "every managed key with its state (never its secret)")
    p = _leaf(up_sub, "reinstate", _upstream_keys_reinstate, "put a cooling or out key back at once")
    p.add_argument("provider")
    p.add_argument("key_id")

    p = _leaf(subparsers, "audit", _audit, "the control-plane audit log, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--account-id")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m trex_serve.local.cli_admin ...``) for when cli.py is not wired."""
    parser = argparse.ArgumentParser(prog="trex-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
