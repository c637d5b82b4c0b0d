"""Every failure leaves the API as one JSON shape: `{"error": CODE, "message": TEXT}`.

The message says what is wrong and what to do, as the CLI's one-line errors
do. Bad input is a 4xx; an unexpected exception is logged here with its
traceback and reaches the client only as a short 500 with no internals, so a
bug never leaks paths, keys or stack frames.
"""

from __future__ import annotations

import errno
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


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
        if e.status_code == 404:
            msg = f"no such endpoint: {req.url.path}; the API is under /v1 (see /openapi.json)"
        elif e.status_code == 405:
            method = "HEAD" if req.scope.get("vaultsync.head") else req.method
            msg = f"{method} is not allowed on {req.url.path} (see /openapi.json)"
        elif e.status_code == 400 and "parsing the body" in msg:
            # FastAPI's words for a body json.loads gave up on (e.g. nested too deep).
            msg = "the request body could not be read as JSON; send one small JSON object"
        return error_response(e.status_code, code, msg, dict(e.headers or {}))

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
        log.exception("unexpected error on %s %s", req.method, req.url.path)
        return error_response(
            500, "internal", "internal error; the server log has the details (please report it)"
        )
