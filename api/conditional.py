"""Conditional requests on downloads (RFC 9110 §13), so clients and caches revalidate cheaply.

A help-desk tool or a browser that already holds a file as of a point asks
again with the validators it was given (ETag, Last-Modified) and gets a 304
with no body instead of the whole file; a resumed download (Range with
If-Range) continues only if the file is still the same version. The
preconditions are evaluated in the order of §13.2.2:

1. If-Match (strong comparison; `*` matches any file) false: 412.
2. Else If-Unmodified-Since, a valid date, and the file changed after it: 412.
3. If-None-Match (weak comparison; `*` matches) true for a listed tag: 304
   for GET and HEAD (the only methods here).
4. Else If-Modified-Since, a valid date, and the file not changed after it: 304.
5. Range with If-Range: the range applies only if the validator matches
   (an ETag compared strongly, a weak one never matches; a date equal to
   Last-Modified, and only when Last-Modified is strong, i.e. at least a
   second before the response's Date), else the whole file is sent (200).

HTTP dates have whole seconds, so the file's mtime is compared truncated to
the second, as it appears in Last-Modified. An unparseable or multi-valued
date field is ignored, as the RFC requires.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

from starlette.datastructures import Headers


def http_date(value: str | None) -> int | None:
    """An HTTP-date (any of the three RFC 9110 §5.6.7 forms) as epoch seconds; None if invalid."""
    if value is None or value.count(",") > 1:  # more than one member: ignored
        return None
    try:
        dt = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if dt.tzinfo is None:  # asctime form: GMT by definition
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def _tags(value: str) -> list[str]:
    """The entity tags of an If-Match / If-None-Match list, quotes kept, `W/` kept."""
    out: list[str] = []
    rest = value.strip()
    while rest:
        rest = rest.lstrip(", \t")
        if not rest:
            break
        weak = rest.startswith("W/")
        body = rest[2:] if weak else rest
        if not body.startswith('"'):
            # Not an entity-tag: take the token up to the next comma (never equal to ours).
            tok, _, rest = rest.partition(",")
            out.append(tok.strip())
            continue
        end = body.find('"', 1)
        if end < 0:
            out.append(rest)
            break
        out.append(("W/" if weak else "") + body[: end + 1])
        rest = body[end + 1 :]
    return out


def _weak_match(listed: str, tag: str) -> bool:
    return listed.removeprefix("W/") == tag.removeprefix("W/")


def _strong_match(listed: str, tag: str) -> bool:
    return not listed.startswith("W/") and not tag.startswith("W/") and listed == tag


def evaluate(headers: Headers, tag: str, mtime_s: int) -> int | None:
    """The status a precondition imposes (412 or 304), or None to go on (steps 1-4)."""
    if_match = headers.get("if-match")
    if if_match is not None:
        listed = _tags(if_match)
        if if_match.strip() != "*" and not any(_strong_match(t, tag) for t in listed):
            return 412
    else:
        since = http_date(headers.get("if-unmodified-since"))
        if since is not None and mtime_s > since:
            return 412
    if_none = headers.get("if-none-match")
    if if_none is not None:
        if if_none.strip() == "*" or any(_weak_match(t, tag) for t in _tags(if_none)):
            return 304
        return None
    since = http_date(headers.get("if-modified-since"))
    if since is not None and mtime_s <= since:
        return 304
    return None


def range_applies(headers: Headers, tag: str, mtime_s: int, now_s: int) -> bool:
    """Step 5: whether a Range may be honoured given If-Range (true without If-Range)."""
    if_range = headers.get("if-range")
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        return _strong_match(value, tag)
    date = http_date(value)
    return date is not None and date == mtime_s and mtime_s <= now_s - 1


def last_modified(mtime_s: int) -> str:
    """The Last-Modified value (IMF-fixdate) of a file whose mtime is `mtime_s`."""
    return format_datetime(datetime.fromtimestamp(mtime_s, UTC), usegmt=True)
