"""Warnings about a condition that lasts (a full disk) without one line per request.

A full disk fails every write and every background flush, hundreds a second:
the log would fill the very disk it is about. The first report goes out at
once; repeats within `interval` are counted and summed up in the next line.
"""

from __future__ import annotations

import logging
import time


class Throttled:
    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self.log = logger
        self.interval = interval
        self._last = -float("inf")
        self._held = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held += 1
            return
        if self._held:
            msg += f" (and {self._held} more like it in the last {now - self._last:.0f} s)"
        self._last, self._held = now, 0
        self.log.warning(msg, *args)
