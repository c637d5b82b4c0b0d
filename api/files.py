"""Browsing and downloading the volume as of a point: listing, metadata, content.

Paths are resolved from the root through the catalog (symlinks are shown,
never followed), so nothing outside the volume is reachable. Downloads are
streamed in 1 MiB reads, the next read under way while the client drains
the last, with a fixed Content-Length, a strong ETag (the file's identity
and version: volume, inode, size, mtime, ctime, which are the same at every
point where the content is), Last-Modified, single byte ranges, and the
conditional requests of RFC 9110 §13 (conditional.py): 304 on If-None-Match
or If-Modified-Since, 412 on If-Match or If-Unmodified-Since, If-Range
guarding a resumed Range. They are sent as attachments with `nosniff`, so a
file from the volume is never rendered as a page on the API's own origin.

A name in the volume is any bytes but NUL and '/': a newline, or bytes that
are not UTF-8. The URL path is read byte for byte (each `%XX` is one byte,
taken from the raw request, not from the server's UTF-8 decoding, which
replaced such bytes), and matched across newlines, so every entry a listing
shows can be fetched: its `path_url` is that path, ready to append to
/v1/tree, /v1/meta or /v1/content.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as FastApiPath
from fastapi.responses import StreamingResponse
from starlette.convertors import Convertor, register_url_convertor

from vaultsync.engine.catalog import Inode
from vaultsync.points.restore import RestoreError, resolve_path

from . import conditional
from .auth import Auth
from .errors import ApiError, documented, shown
from .metrics import Metrics
from .paths import from_url_path, url_path, volume_path
from .point_views import View
from .ranges import parse_range
from .source import Backend

READ_SIZE = 1 << 20
DOTS = 2  # readdir offsets 0 and 1 are "." and ".."
MAX_CURSOR = 2**53 - 1  # what every JSON client reads exactly

PathIn = Annotated[
    str,
    FastApiPath(
        description="A path in the volume; each %XX is one byte of it (names need not be "
        "UTF-8), as in an entry's `path_url`.",
    ),
]
At = Annotated[
    str | None,
    Query(
        max_length=200,
        description="An LSN, an ISO-8601 time, or a snapshot name (as `--at`); default: newest.",
    ),
]

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


class _AnyPath(Convertor[str]):
    """Starlette's `path`, but across newlines too (its `.*` stops at one: a 404)."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anypath", _AnyPath())


def _exact_path(request: Request, route: str, decoded: str) -> str:
    """The volume path the URL names, byte for byte (as a str with surrogate escapes).

    `decoded` is the server's reading of the same path, in which bytes that
    are not UTF-8 became U+FFFD; it is used only if the raw path is missing.
    """
    raw = request.scope.get("raw_path")
    if raw is not None:
        full = from_url_path(bytes(raw))
        if full.startswith(route):
            return full[len(route) :]
    return decoded


def _name(raw: bytes) -> dict[str, Any]:
    try:
        return {"name": raw.decode("utf-8")}
    except UnicodeDecodeError:  # not UTF-8: shown replaced, addressable by the bytes
        return {"name": raw.decode("utf-8", "replace"), "name_bytes_hex": raw.hex()}


def entry(node: Inode) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": _TYPES.get(stat.S_IFMT(node.mode), "unknown"),
        "size": node.size,
        "mode": f"{stat.S_IMODE(node.mode):04o}",
        "uid": node.uid,
        "gid": node.gid,
        "mtime": _iso(node.mtime_ns),
        "mtime_ns": node.mtime_ns,
        "ino": node.ino,
    }
    if node.target is not None:
        out["target"] = node.target.decode("utf-8", "replace")
    return out


def etag(view: View, node: Inode) -> str:
    key = f"{view.volume_id}:{node.ino}:{node.size}:{node.mtime_ns}:{node.ctime_ns}"
    return '"' + hashlib.sha256(key.encode()).hexdigest()[:32] + '"'


def _point(view: View) -> dict[str, Any]:
    return {
        "lsn": view.lsn,
        "time": _iso(view.time_ns) if view.time_ns else None,
        "live": view.live,
    }


def _lookup(view: View, path: str) -> Inode:
    try:
        return resolve_path(view.fs, path)
    except RestoreError as e:
        raise ApiError(404, "not_found", str(e)) from None


def router(backend: Backend, auth: Auth, metrics: Metrics) -> APIRouter:
    r = APIRouter(prefix="/v1", dependencies=[Depends(auth.need("read"))])
    max_page = backend.cfg.api.max_page

    @r.get(
        "/tree/{path:anypath}",
        summary="List a directory as of a point (paged)",
        description="Each entry's `path_url` is its path as this URL takes it, byte for byte.",
        responses=documented(401, 404, 422, 502, 503),
    )
    async def tree(
        request: Request,
        path: PathIn,
        at: At = None,
        cursor: Annotated[int, Query(ge=0, le=MAX_CURSOR)] = 0,
        # The bound is this server's, so the default-value form: a string annotation (this
        # module's `from __future__ import annotations`) cannot see `max_page`.
        limit: int | None = Query(
            default=None,
            ge=1,
            le=max_page,
            description=f"Default {min(200, max_page)}; at most api.max_page ({max_page}).",
        ),
    ) -> dict[str, Any]:
        limit = limit or min(200, max_page)
        clean = volume_path(_exact_path(request, "/v1/tree/", path))
        async with backend.views.use(at) as view:
            node = _lookup(view, clean)
            if not stat.S_ISDIR(node.mode):
                raise ApiError(
                    400,
                    "not_a_directory",
                    f"{shown(clean)} is a {entry(node)['type']}, not a directory",
                )
            rows = view.fs.readdir(node.ino, max(cursor, DOTS), limit + 1)
            rows = [row for row in rows if row[0] not in (b".", b"..")]
            more = len(rows) > limit
            rows = rows[:limit]
            parent = os.fsencode(clean).rstrip(b"/")
            entries = [
                {**_name(name), "path_url": url_path(parent + b"/" + name), **entry(child)}
                for name, child, _ in rows
            ]
            return {
                "path": shown(clean),
                "path_url": url_path(clean),
                "point": _point(view),
                "entries": entries,
                "next_cursor": rows[-1][2] if more and rows else None,
            }

    @r.get(
        "/meta/{path:anypath}",
        summary="Metadata of a file or directory as of a point",
        responses=documented(401, 404, 422, 502, 503),
    )
    async def meta(request: Request, path: PathIn, at: At = None) -> dict[str, Any]:
        clean = volume_path(_exact_path(request, "/v1/meta/", path))
        async with backend.views.use(at) as view:
            node = _lookup(view, clean)
            xattrs = [n.decode("utf-8", "replace") for n in view.fs.listxattr(node.ino)]
            return {
                "path": shown(clean),
                "path_url": url_path(clean),
                "point": _point(view),
                **entry(node),
                "nlink": node.nlink,
                "ctime": _iso(node.ctime_ns),
                "xattrs": xattrs,
                "etag": etag(view, node) if stat.S_ISREG(node.mode) else None,
            }

    @r.api_route(
        "/content/{path:anypath}",
        methods=["GET", "HEAD"],
        summary="Download a file as of a point (streamed, HTTP Range)",
        description=(
            "GET or HEAD. Conditional requests as RFC 9110 §13: If-None-Match or "
            "If-Modified-Since give 304, If-Match or If-Unmodified-Since 412, If-Range "
            "guards Range. Cache-Control allows reuse only as of a fixed point."
        ),
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {}}},
            206: {
                "description": "The range asked for.",
                "content": {"application/octet-stream": {}},
            },
            304: {"description": "Not modified: the client's copy is this version."},
            **documented(401, 404, 412, 416, 422, 502, 503),
        },
    )
    async def content(request: Request, path: PathIn, at: At = None) -> Response:
        clean = volume_path(_exact_path(request, "/v1/content/", path))
        view = await backend.views.acquire(at)
        try:
            node = _lookup(view, clean)
            if not stat.S_ISREG(node.mode):
                kind = entry(node)["type"]
                hint = f" pointing to {entry(node)['target']!r}" if kind == "symlink" else ""
                raise ApiError(
                    400,
                    "not_a_file",
                    f"{shown(clean)} is a {kind}{hint}; only files can be downloaded",
                )
            tag = etag(view, node)
            mtime_s = node.mtime_ns // 10**9
            name = shown(clean).rsplit("/", 1)[-1] or "file"
            validators = {
                "ETag": tag,
                "Last-Modified": conditional.last_modified(mtime_s),
                # Only a fixed point may be reused without asking: "latest", a recent
                # time and a snapshot name can show another version on the next request.
                "Cache-Control": "private, max-age=3600" if view.fixed else "private, no-cache",
                "X-Vaultsync-LSN": str(view.lsn),
            }
            verdict = conditional.evaluate(request.headers, tag, mtime_s)
            if verdict == 304:
                # RFC 9110 §15.4.5: the validators and caching fields, no content.
                await backend.views.release(view)
                return Response(status_code=304, headers=validators)
            if verdict == 412:
                raise ApiError(
                    412,
                    "precondition_failed",
                    f"{shown(clean)} as of LSN {view.lsn} does not match If-Match / "
                    "If-Unmodified-Since (the file is another version)",
                    validators,
                )
            headers = {
                **validators,
                "Accept-Ranges": "bytes",
                "Content-Disposition": f"attachment; filename*=UTF-8''{quote(name)}",
                "X-Content-Type-Options": "nosniff",
            }
            size = node.size
            rng = request.headers.get("range")
            if not conditional.range_applies(request.headers, tag, mtime_s, int(time.time())):
                rng = None  # the client's copy is another version: send it whole
            span = parse_range(rng, size)
            start, end = span if span is not None else (0, size)
            status = 200
            if span is not None:
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            headers["Content-Length"] = str(end - start)
        except BaseException:
            await backend.views.release(view)
            raise
        if request.method == "HEAD":
            await backend.views.release(view)
            return Response(status_code=status, headers=headers)

        async def body() -> AsyncIterator[bytes]:
            fs, ino = view.fs, node.ino

            def read_at(pos: int) -> asyncio.Future[bytes] | None:
                if pos >= end:
                    return None
                return asyncio.ensure_future(fs.read(ino, pos, min(READ_SIZE, end - pos)))

            # One read ahead of the one being sent: the next piece is fetched and
            # decoded (in worker threads) while the client drains this one.
            nxt = read_at(start)
            try:
                pos = start
                while nxt is not None:
                    data = await nxt
                    if not data:
                        # The live file shrank under us: end the stream short, visibly.
                        nxt = None
                        raise ApiError(
                            500, "file_changed", f"{shown(clean)} changed while being sent"
                        )
                    pos += len(data)
                    nxt = read_at(pos)
                    metrics.bytes_sent += len(data)
                    yield data
            finally:
                if nxt is not None:
                    nxt.cancel()
                    with contextlib.suppress(BaseException):
                        await nxt
                await backend.views.release(view)

        return StreamingResponse(
            body(), status_code=status, headers=headers, media_type="application/octet-stream"
        )

    return r
