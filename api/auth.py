"""Bearer tokens with read and admin scopes, checked against hashes in the config.

Tokens are random and long (`new_token`), so one SHA-256 is enough to keep
the config file from being a list of passwords; comparisons run in constant
time over every configured hash, of the token exactly as sent (nothing is
trimmed: a token with a stray U+00A0 is another token). A token is never
logged or echoed back, and one sent in the URL (`?token=`), where proxies,
access logs and browser history keep it, is refused.

Without tokens, only a server bound to loopback with an explicit
`open_on_loopback = true` lets requests in, and then with the admin scope:
that is a single-user machine where anyone who can connect could also read
the config. Anyone, that is, including every web page its browser opens: a
page may send requests to 127.0.0.1, and a name its owner points at
127.0.0.1 (DNS rebinding) even lets it read the answers. So an open server
answers only requests whose Host is its own name (the listen host, or a
loopback name) and whose Origin, if any, is its own; and every POST must
say `Content-Type: application/json`, which no page of another origin can
send without the browser asking first (a preflight this server never
grants). A token is not sent by a browser on its own, so with tokens none
of this is needed, and a reverse proxy may use any name.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import parse_qsl

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vaultsync.config import ApiConfig, is_loopback

from .errors import ApiError
from .limits import Receive, Send, refuse
from .limits import Scope as AsgiScope

Scope = Literal["read", "admin"]
MIN_TOKEN_LENGTH = 24
# RFC 6750 §2.1 b64token: what a Bearer header can carry as it is.
TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
QUERY_TOKEN_NAMES = frozenset({"token", "access_token"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

bearer = HTTPBearer(auto_error=False, description="A token from `vaultsync token new`.")


def new_token() -> str:
    return "vst_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The config's hash of `token`, exactly as given: the server compares what it is sent."""
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"a token needs at least {MIN_TOKEN_LENGTH} characters; "
            "let `vaultsync token new` make a random one"
        )
    if not TOKEN_CHARS.fullmatch(token):
        raise ValueError(
            "a token may hold only letters, digits and - . _ ~ + / (then = signs), so that "
            "an Authorization header carries it unchanged; let `vaultsync token new` make one"
        )
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def _bearer_token(header: str) -> str:
    """The token of `Authorization: Bearer TOKEN`, as sent (RFC 6750 §2.1: 1*SP between)."""
    scheme, sep, rest = header.partition(" ")
    token = rest.lstrip(" ")
    if scheme.lower() != "bearer" or not sep or not token:
        raise ApiError(
            401,
            "unauthorized",
            "the Authorization header must be 'Bearer TOKEN'",
            {"WWW-Authenticate": "Bearer"},
        )
    return token


class Auth:
    def __init__(self, api: ApiConfig, listen_host: str) -> None:
        self.tokens = [(t.hash, t.scope) for t in api.tokens]
        self.open = api.open_on_loopback and is_loopback(listen_host)
        self.names = LOOPBACK_NAMES | {listen_host.strip("[]").lower()}

    def foreign_page(self, headers: list[tuple[bytes, bytes]]) -> tuple[int, str, str] | None:
        """Why an open server refuses these headers (status, code, message); None: its own."""
        hosts = [v.decode("latin-1") for k, v in headers if k == b"host"]
        origins = [v.decode("latin-1") for k, v in headers if k == b"origin"]
        names = " or ".join(sorted(self.names))
        if len(hosts) != 1 or _host_name(hosts[0]) not in self.names:
            return (
                400,
                "bad_host",
                f"this server answers only to the names {names} in the Host header, since it "
                "needs no token (api.open_on_loopback); use one of them in the URL",
            )
        if len(origins) > 1 or (origins and not _same_origin(origins[0], hosts[0])):
            return (
                403,
                "foreign_origin",
                "a page of another origin may not use this server, since it needs no token "
                "(api.open_on_loopback); open the page this server serves at /ui/",
            )
        return None

    def scope_of(self, token: str | None) -> Scope:
        if token is None:
            if self.open:
                return "admin"
            raise ApiError(
                401,
                "unauthorized",
                "this request needs a token: send 'Authorization: Bearer TOKEN' "
                "(an admin creates one with `vaultsync token new`)",
                {"WWW-Authenticate": "Bearer"},
            )
        digest = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        found: Scope | None = None
        for h, scope in self.tokens:
            if hmac.compare_digest(h, digest):
                found = scope
        if found is None:
            raise ApiError(
                401,
                "unauthorized",
                "the token is not valid for this server; check it, or ask for a new one",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return found

    def need(self, scope: Scope) -> Callable[..., Awaitable[Scope]]:
        """A FastAPI dependency that admits `scope` (admin also covers read)."""

        async def check(
            request: Request,
            _documented: HTTPAuthorizationCredentials | None = Depends(bearer),
        ) -> Scope:
            # `bearer` puts the scheme in /openapi.json; the header is read here, untrimmed.
            sent = request.headers.getlist("authorization")
            if len(sent) > 1:
                raise ApiError(
                    401,
                    "unauthorized",
                    "send one Authorization header, not several",
                    {"WWW-Authenticate": "Bearer"},
                )
            have = self.scope_of(_bearer_token(sent[0]) if sent else None)
            if scope == "admin" and have != "admin":
                raise ApiError(
                    403,
                    "forbidden",
                    "this token has the read scope; snapshots and restores need an admin token",
                )
            return have

        return check


async def require_json(request: Request) -> None:
    """A dependency of every route: a POST (PUT, PATCH) must declare a JSON body.

    Even one without a body (cancelling a job): a page of another origin can
    send a POST with no Content-Type, or a form's, without the browser asking
    the server first; it cannot send this one.
    """
    if request.method not in BODY_METHODS:
        return
    sent = request.headers.get("content-type")
    media = (sent or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    got = f"got {sent[:80]!r}" if sent else "none was sent"
    raise ApiError(
        415,
        "unsupported_media_type",
        f"{request.method} {request.url.path[:100]!r} needs 'Content-Type: application/json' "
        f"({got}); send it with a JSON body, and also when there is no body",
    )


def _host_name(value: str) -> str | None:
    """The name in a Host (or Origin authority) `name[:port]`, lowercased; None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
    else:
        name, sep, port = value.rpartition(":")
        name, rest = (name, ":" + port) if sep else (value, "")
    if rest and not re.fullmatch(r":[0-9]{1,5}", rest):
        return None
    return name or None


def _same_origin(origin: str, host: str) -> bool:
    """Whether `Origin` names this server as the client reached it (the Host it sent)."""
    scheme, sep, authority = origin.strip().partition("://")
    return (
        bool(sep)
        and scheme.lower() in ("http", "https")
        and authority.lower() == host.strip().lower()
    )


class CallerChecks:
    """ASGI middleware, before any route: no token in a URL, on any server; and an open
    server answers only requests from its own names and pages.

    See the module docstring for why the Host and Origin checks apply only
    when `open_on_loopback` lets requests in without a token.
    """

    def __init__(self, app: Any, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = (scope.get("query_string") or b"").decode("latin-1")
        if any(k.lower() in QUERY_TOKEN_NAMES for k, _ in parse_qsl(query, True)):
            await refuse(
                send,
                400,
                "token_in_url",
                "a token is not accepted in the URL, where logs and browser history keep it; "
                "send it as 'Authorization: Bearer TOKEN', and replace that token if the URL "
                "was used anywhere else",
            )
            return
        if self.auth.open:
            refusal = self.auth.foreign_page(scope.get("headers") or [])
            if refusal is not None:
                await refuse(send, *refusal)
                return
        await self.app(scope, receive, send)
