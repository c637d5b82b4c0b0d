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
the second, as it appears in Last-Modified. A date field that is not an
HTTP-date (one of the three forms of RFC 9110 §5.6.7, always GMT) or holds
several values is ignored, as the RFC requires: the fields are matched against
the grammar itself rather than handed to a lenient mail-date parser, which
took numeric zones and years of any size and let them overflow into a 500.
"""

from __future__ import annotations

import calendar
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from starlette.datastructures import Headers

_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_LONG = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = r"(?P<month>Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(?P<h>[0-9]{2}):(?P<m>[0-9]{2}):(?P<s>[0-9]{2})"
_FORMS = [
    # IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
    re.compile(rf"{_DAY}, (?P<day>[0-9]{{2}}) {_MONTH} (?P<year>[0-9]{{4}}) {_TIME} GMT", re.I),
    # rfc850-date (obsolete): Sunday, 06-Nov-94 08:49:37 GMT
    re.compile(rf"{_DAY_LONG}, (?P<day>[0-9]{{2}})-{_MONTH}-(?P<yy>[0-9]{{2}}) {_TIME} GMT", re.I),
    # asctime-date (obsolete): Sun Nov  6 08:49:37 1994
    re.compile(rf"{_DAY} {_MONTH} (?P<day>[0-9]{{2}}| [0-9]) {_TIME} (?P<year>[0-9]{{4}})", re.I),
]


def http_date(value: str | None) -> int | None:
    """An HTTP-date (any of the three RFC 9110 §5.6.7 forms) as epoch seconds; None if invalid."""
    if value is None:
        return None
    for form in _FORMS:
        m = form.fullmatch(value.strip())
        if m is not None:
            break
    else:
        return None
    fields = m.groupdict()
    if fields.get("yy") is not None:
        # §5.6.7: a two-digit year more than 50 years ahead is the last such year past.
        this_year = time.gmtime().tm_year
        year = this_year - this_year % 100 + int(fields["yy"])
        if year > this_year + 50:
            year -= 100
    else:
        year = int(fields["year"])
    try:
        dt = datetime(
            year,
            _MONTHS[fields["month"].lower()],
            int(fields["day"]),
            int(fields["h"]),
            int(fields["m"]),
            min(int(fields["s"]), 59),  # a leap second (60) counts as the one before it
            tzinfo=UTC,
        )
    except ValueError:  # year 0, 31 Feb, hour 25, ...
        return None
    return calendar.timegm(dt.utctimetuple())


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
