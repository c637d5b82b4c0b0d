"""Paths in requests: volume paths normalised and confined, restore destinations checked.

A volume path is resolved by looking names up in the catalog from the root,
so it can never leave the volume; still, `..`, NUL bytes, and over-long
names are refused outright rather than silently reinterpreted, so the caller
learns that the request was wrong. (The server sees `%2e%2e` already
decoded to `..`, so the encoded form is refused by the same rule.)

A name may be any bytes but NUL and '/', so a volume path is a str with
surrogate escapes for bytes that are not UTF-8 (`os.fsdecode`), and its form
in a URL, `url_path`, spells every such byte as %XX: the listings give it as
`path_url`, and the routes and restore bodies take it back, byte for byte.

Restore destinations are on the server's own disk: they must resolve, with
every symlink followed, to a place under one of `api.restore_roots`.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote_to_bytes

from .errors import ApiError

MAX_PATH = 4096
MAX_NAME = 255


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_path", message)


def volume_path(raw: str) -> str:
    """`raw` as a clean absolute path inside the volume ('/' for the root)."""
    if len(raw.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise _bad(f"the path is longer than {MAX_PATH} bytes")
    if "\x00" in raw:
        raise _bad("the path contains a NUL byte")
    parts = []
    for part in raw.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise _bad(
                f"{raw!r}: '..' is not allowed in a volume path; give the path from the "
                "volume's root, e.g. /projects/report.txt"
            )
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise _bad(f"a name in {raw!r} is longer than {MAX_NAME} bytes")
        parts.append(part)
    return "/" + "/".join(parts)


def url_path(path: str | bytes) -> str:
    """A volume path as a URL spells it (after /v1/tree etc.): other bytes than these as %XX."""
    return quote(os.fsencode(path), safe="/")


def from_url_path(text: str | bytes) -> str:
    """The volume path a `url_path` spells, each %XX one byte (not decoded as UTF-8)."""
    return os.fsdecode(unquote_to_bytes(text))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def restore_destination(raw: str, roots: list[Path]) -> Path:
    """Where a restore may write: under a restore root, after following every symlink."""
    if not roots:
        raise ApiError(
            403,
            "no_restore_roots",
            "this server has no api.restore_roots configured, so it restores nowhere; "
            "add a directory to api.restore_roots in the config",
        )
    if not raw or "\x00" in raw or len(raw) > MAX_PATH:
        raise _bad("destination must be a non-empty path without NUL bytes, at most 4096 bytes")
    pure = PurePosixPath(raw)
    if ".." in pure.parts:
        raise _bad(f"destination {raw!r}: '..' is not allowed")
    candidate = Path(raw) if pure.is_absolute() else roots[0] / pure
    if not any(_under(os.path.normpath(candidate), os.path.normpath(r)) for r in roots):
        raise _bad(
            f"destination {raw!r} is outside the restore roots "
            f"({', '.join(str(r) for r in roots)}); give a path under one of them"
        )
    real = os.path.realpath(candidate)
    for r in roots:
        if _under(os.path.normpath(candidate), os.path.normpath(r)):
            root_real = os.path.realpath(r)
            if not os.path.isdir(root_real):
                raise ApiError(
                    409,
                    "restore_root_missing",
                    f"restore root {r} does not exist on the server; create it",
                )
            if not _under(real, root_real):
                raise _bad(
                    f"destination {raw!r} leads through a symlink to {real}, outside the "
                    "restore roots; choose a destination without such links"
                )
            return Path(real)
    raise _bad(f"destination {raw!r} is outside the restore roots")  # pragma: no cover
