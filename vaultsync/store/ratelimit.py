"""Bandwidth caps for long copies (migrate, restore), and the way users write them.

A cap exists so that a copy running beside production (a migration of a live
volume, a help-desk restore on the server) leaves the disk and the network to
the applications. It is a token schedule, not a bucket: each `take(n)` books
the next n/rate seconds, so concurrent copies share one cap fairly and a
burst never exceeds it by more than one call's bytes.
"""

from __future__ import annotations

import asyncio
import re
import time

from vaultsync.errors import ConfigError


class RateLimiter:
    def __init__(self, rate: float | None) -> None:
        self.rate = rate if rate and rate > 0 else None
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def take(self, nbytes: int) -> None:
        if self.rate is None:
            return
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
            wait = start - now
        if wait > 0:
            await asyncio.sleep(wait)


def parse_rate(text: str | None, what: str = "--bwlimit") -> float | None:
    """Bytes per second from 10M, 512K, 1.5MiB, 1048576 (per second); None or 0: no cap."""
    if text is None or text.strip() in ("", "0"):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?B)?(/s)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(
            f"{what} {text!r} is not a rate; write it like 10M, 512K or 1048576 (bytes/s)"
        )
    mult = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2).upper()]
    return float(m.group(1)) * mult
