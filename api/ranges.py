"""HTTP Range (RFC 9110 §14) for downloads: one byte range per request.

A syntactically invalid header, or several ranges, is ignored (the whole
file is sent), which the RFC allows; a range that starts past the end is a
416 with `Content-Range: bytes */SIZE`, so the client learns the size.

Positions are digits of any length (the RFC sets no bound), so they are
never handed to `int()` whole: Python refuses to convert more than 4,300
digits, which made `bytes=0-<4,301 digits>` a 500. A position longer than
any file is read as "past the end", which is what it means.
"""

from __future__ import annotations

import re

from .errors import ApiError

_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")  # ASCII digits: int() takes others too
PAST_ANY_FILE = 1 << 63  # larger than any file size the catalog can hold
_MAX_DIGITS = len(str(PAST_ANY_FILE))


def _position(digits: str) -> int:
    """A range position as a number, capped at PAST_ANY_FILE however many digits it has."""
    digits = digits.lstrip("0") or "0"
    return PAST_ANY_FILE if len(digits) > _MAX_DIGITS else min(int(digits), PAST_ANY_FILE)


def _shown(header: str) -> str:
    return repr(header) if len(header) <= 80 else repr(header[:60]) + f" ({len(header)} characters)"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single satisfiable range; None to send everything."""
    if not header:
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = _position(first)
        end = min(_position(last) + 1, size) if last else size
        if last and _position(last) < start:
            return None  # invalid: ignored
    else:
        suffix = _position(last)
        if suffix == 0:
            start, end = size, size  # "the last 0 bytes": unsatisfiable
        else:
            start, end = max(0, size - suffix), size
    if start >= size or start >= end:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"the range {_shown(header)} is outside the file ({size} bytes)",
            {"Content-Range": f"bytes */{size}"},
        )
    return start, end
