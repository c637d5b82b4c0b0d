"""HTTP Range (RFC 9110 §14) for downloads: one byte range per request.

A syntactically invalid header, or several ranges, is ignored (the whole
file is sent), which the RFC allows; a range that starts past the end is a
416 with `Content-Range: bytes */SIZE`, so the client learns the size.
"""

from __future__ import annotations

import re

from .errors import ApiError

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single satisfiable range; None to send everything."""
    if not header:
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = min(int(last) + 1, size) if last else size
        if last and int(last) < start:
            return None  # invalid: ignored
    else:
        suffix = int(last)
        if suffix == 0:
            start, end = size, size  # "the last 0 bytes": unsatisfiable
        else:
            start, end = max(0, size - suffix), size
    if start >= size or start >= end:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"the range {header!r} is outside the file ({size} bytes)",
            {"Content-Range": f"bytes */{size}"},
        )
    return start, end
