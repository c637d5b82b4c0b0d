"""Every failure leaves the API as one JSON shape: `{"error": CODE, "message": TEXT}`.

The message says what is wrong and what to do, as the CLI's one-line errors
do. Bad input is a 4xx; an unexpected exception is logged here with its
traceback and reaches the client only as a short 500 with no internals, so a
bug never leaks paths, keys or stack frames.

The same shape is what /openapi.json promises for every 4xx an operation can
give (`documented`), so a client, or a schema-driven fuzzer, can rely on it.
Paths from the volume may hold bytes that are not UTF-8 (kept as surrogate
escapes): JSON is rendered so that such a string can never fail the response.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from vaultsync.engine.posix import FsError
from vaultsync.errors import ConfigError, CryptoError, FormatError, VaultsyncError, VolumeError
from vaultsync.points.recovery import PointError
from vaultsync.points.restore import RestoreError
from vaultsync.points.snapshots import SnapshotError
from vaultsync.store.objectstore import StoreError

log = logging.getLogger("vaultsync.api")


class ApiError(Exception):
    """A request the API refuses, with the HTTP status and a message for the caller."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class SafeJSONResponse(JSONResponse):
    """JSON that cannot fail on a path with non-UTF-8 bytes (a lone surrogate escape).

    Such a string has no UTF-8 form, so the usual rendering raised and the
    request became a 500; here it falls back to ASCII JSON, where the escape
    is written as `\\udcXX`, valid JSON that every parser reads.
    """

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def shown(path: str) -> str:
    """A volume path for a message or a JSON field: undecodable bytes shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return SafeJSONResponse(
        {"error": code, "message": message}, status_code=status, headers=headers
    )


class ErrorOut(BaseModel):
    """The body of every error answer."""

    error: str = Field(description="A stable code for programs, e.g. `not_found`.")
    message: str = Field(description="For a person: what is wrong and what to do about it.")


_MEANINGS = {
    400: "Malformed: a path, point or range that cannot be, a body that is not JSON, a token "
    "in the URL, or (open servers) a Host name this server does not answer to.",
    401: "No token, or one this server does not know: send `Authorization: Bearer TOKEN`.",
    403: "A read token where the admin scope is needed, or (open servers) a request from a "
    "page of another origin.",
    404: "The path, point, snapshot or restore job does not exist.",
    408: "The request was not received in time.",
    409: "In conflict with the server's state (not the writer, the snapshot exists, the "
    "destination holds other files, a restore root is missing).",
    412: "If-Match or If-Unmodified-Since does not hold for this version.",
    413: "The body is larger than 64 KiB.",
    414: "The URL is longer than 8 KiB.",
    415: "A POST whose Content-Type is not `application/json` (send it even without a body).",
    416: "The range starts past the end of the file.",
    422: "A parameter or body field outside what this document allows.",
    429: "Too many restore jobs are running.",
    502: "The target could not be read.",
    503: "The live volume cannot be served until it is remounted.",
}
# What any request can be answered with, before its route runs: limits.py and auth.py.
EVERY_REQUEST = (400, 403, 413, 414)


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses: the common ones and `codes`, all as ErrorOut."""
    return {
        code: {"model": ErrorOut, "description": _MEANINGS[code]}
        for code in sorted({*EVERY_REQUEST, *codes})
    }


def allowed_methods(request: Request, declared: str | None) -> str:
    """Every method some route answers at this path (RFC 9110 §10.2.1), HEAD wherever GET is.

    Starlette's 405 names (in `declared`) only the methods of the first route
    with this path, so `/v1/restores` (GET and POST, two routes) claimed to
    allow POST alone. The other routes that match are added; a router
    included as a whole shows no methods of its own, but its routes each
    have a path of their own, so the declared ones cover them.
    """
    methods = {m.strip() for m in (declared or "").split(",") if m.strip()}
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def _from_vaultsync(e: VaultsyncError) -> tuple[int, str]:
    if isinstance(e, PointError):
        return 404, "unknown_point"
    if isinstance(e, SnapshotError):
        return 409 if "already exists" in str(e) else 404 if "no snapshot" in str(e) else 400, (
            "snapshot"
        )
    if isinstance(e, RestoreError):
        return 409, "restore_conflict"
    if isinstance(e, StoreError):
        return 502, "target_unavailable"
    if isinstance(e, CryptoError | FormatError | VolumeError | ConfigError):
        return 500, "volume_error"
    return 400, "bad_request"


_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
}


def _validation_message(e: RequestValidationError) -> str:
    first = e.errors()[0] if e.errors() else {}
    loc = [str(p) for p in first.get("loc", ())]
    where = f"{loc[0]} {'.'.join(loc[1:])}" if len(loc) > 1 else (loc[0] if loc else "request")
    msg = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    return f"{where}: {msg}; see /openapi.json for the accepted values"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _validation_message(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, e: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(e.status_code, "http_error")
        msg = str(e.detail)
        headers = dict(e.headers or {})
        where = shown(req.url.path)[:200]
        if e.status_code == 404:
            msg = f"no such endpoint: {where}; the API is under /v1 (see /openapi.json)"
        elif e.status_code == 405:
            method = "HEAD" if req.scope.get("vaultsync.head") else req.method
            if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
                method = "that method"  # any token is a method: not echoed
            headers["Allow"] = allowed_methods(req, headers.get("Allow"))
            msg = f"{method} is not allowed on {where} (allowed: {headers['Allow']})"
        elif e.status_code == 400 and "parsing the body" in msg:
            # FastAPI's words for a body json.loads gave up on (e.g. nested too deep).
            msg = "the request body could not be read as JSON; send one small JSON object"
        return error_response(e.status_code, code, msg, headers)

    @app.exception_handler(FsError)
    async def _fs(_: Request, e: FsError) -> JSONResponse:
        status = 404 if e.errno == errno.ENOENT else 400
        return error_response(status, "filesystem", f"{os.strerror(e.errno)} in the volume")

    @app.exception_handler(VaultsyncError)
    async def _vs(_: Request, e: VaultsyncError) -> JSONResponse:
        status, code = _from_vaultsync(e)
        if status >= 500 and status != 502:
            log.error("volume error serving a request: %s", e)
        return error_response(status, code, str(e))

    @app.exception_handler(Exception)
    async def _bug(req: Request, e: Exception) -> JSONResponse:
        # The path is the client's: quoted and cut, so it cannot forge or flood log lines.
        log.exception("unexpected error on %r %r", req.method[:16], req.url.path[:300])
        return error_response(
            500, "internal", "internal error; the server log has the details (please report it)"
        )
