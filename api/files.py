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
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import stat
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse

from vaultsync.engine.catalog import Inode
from vaultsync.points.restore import RestoreError, resolve_path

from . import conditional
from .auth import Auth
from .errors import ApiError
from .metrics import Metrics
from .paths import volume_path
from .point_views import View
from .ranges import parse_range
from .source import Backend

READ_SIZE = 1 << 20
DOTS = 2  # readdir offsets 0 and 1 are "." and ".."

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

    @r.get("/tree/{path:path}", summary="List a directory as of a point (paged)")
    async def tree(
        path: str,
        at: At = None,
        cursor: Annotated[int, Query(ge=0, le=2**62)] = 0,
        limit: Annotated[
            int | None, Query(ge=1, le=100000, description="Default 200; at most api.max_page.")
        ] = None,
    ) -> dict[str, Any]:
        limit = limit or min(200, max_page)
        if limit > max_page:
            raise ApiError(
                400, "page_too_large", f"limit is at most {max_page} (api.max_page) on this server"
            )
        clean = volume_path(path)
        async with backend.views.use(at) as view:
            node = _lookup(view, clean)
            if not stat.S_ISDIR(node.mode):
                raise ApiError(
                    400, "not_a_directory", f"{clean} is a {entry(node)['type']}, not a directory"
                )
            rows = view.fs.readdir(node.ino, max(cursor, DOTS), limit + 1)
            rows = [row for row in rows if row[0] not in (b".", b"..")]
            more = len(rows) > limit
            rows = rows[:limit]
            entries = [{**_name(name), **entry(child)} for name, child, _ in rows]
            return {
                "path": clean,
                "point": _point(view),
                "entries": entries,
                "next_cursor": rows[-1][2] if more and rows else None,
            }

    @r.get("/meta/{path:path}", summary="Metadata of a file or directory as of a point")
    async def meta(path: str, at: At = None) -> dict[str, Any]:
        clean = volume_path(path)
        async with backend.views.use(at) as view:
            node = _lookup(view, clean)
            xattrs = [n.decode("utf-8", "replace") for n in view.fs.listxattr(node.ino)]
            return {
                "path": clean,
                "point": _point(view),
                **entry(node),
                "nlink": node.nlink,
                "ctime": _iso(node.ctime_ns),
                "xattrs": xattrs,
                "etag": etag(view, node) if stat.S_ISREG(node.mode) else None,
            }

    @r.api_route(
        "/content/{path:path}",
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
            206: {},
            304: {},
            412: {},
            416: {},
        },
    )
    async def content(request: Request, path: str, at: At = None) -> Response:
        clean = volume_path(path)
        view = await backend.views.acquire(at)
        try:
            node = _lookup(view, clean)
            if not stat.S_ISREG(node.mode):
                kind = entry(node)["type"]
                hint = f" pointing to {entry(node)['target']!r}" if kind == "symlink" else ""
                raise ApiError(
                    400, "not_a_file", f"{clean} is a {kind}{hint}; only files can be downloaded"
                )
            tag = etag(view, node)
            mtime_s = node.mtime_ns // 10**9
            name = clean.rsplit("/", 1)[-1] or "file"
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
                    f"{clean} as of LSN {view.lsn} does not match If-Match / "
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
                        raise ApiError(500, "file_changed", f"{clean} changed while being sent")
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
