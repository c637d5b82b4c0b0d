"""Bearer tokens with read and admin scopes, checked against hashes in the config.

Tokens are random and long (`new_token`), so one SHA-256 is enough to keep
the config file from being a list of passwords; comparisons run in constant
time over every configured hash. A token is never logged or echoed back.
Without tokens, only a server bound to loopback with an explicit
`open_on_loopback = true` lets requests in, and then with the admin scope:
that is a single-user machine where anyone who can connect could also read
the config.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vaultsync.config import ApiConfig, is_loopback

from .errors import ApiError

Scope = Literal["read", "admin"]
MIN_TOKEN_LENGTH = 24

bearer = HTTPBearer(auto_error=False, description="A token from `vaultsync token new`.")


def new_token() -> str:
    return "vst_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"a token needs at least {MIN_TOKEN_LENGTH} characters; "
            "let `vaultsync token new` make a random one"
        )
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


class Auth:
    def __init__(self, api: ApiConfig, listen_host: str) -> None:
        self.tokens = [(t.hash, t.scope) for t in api.tokens]
        self.open = api.open_on_loopback and is_loopback(listen_host)

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
        digest = "sha256:" + hashlib.sha256(token.strip().encode()).hexdigest()
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
            cred: HTTPAuthorizationCredentials | None = Depends(bearer),
        ) -> Scope:
            if cred is None and request.headers.get("authorization"):
                raise ApiError(
                    401,
                    "unauthorized",
                    "the Authorization header must be 'Bearer TOKEN'",
                    {"WWW-Authenticate": "Bearer"},
                )
            have = self.scope_of(cred.credentials if cred is not None else None)
            if scope == "admin" and have != "admin":
                raise ApiError(
                    403,
                    "forbidden",
                    "this token has the read scope; snapshots and restores need an admin token",
                )
            return have

        return check
