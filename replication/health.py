"""A target's health from what its requests and probes saw: pure logic, no I/O.

States: `healthy` (requests succeed), `degraded` (requests succeed but slowly,
or some fail), `down` (the last `down_after` attempts failed, or nothing
succeeded for `down_seconds`). A down target comes back as healthy on its
first success: the shipper then catches it up from its watermark.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

State = Literal["healthy", "degraded", "down"]


@dataclass
class Health:
    down_after: int = 3
    down_seconds: float = 10.0
    slow_seconds: float = 2.0
    window: int = 20
    state: State = "healthy"
    reason: str = ""
    last_error: str = ""
    last_error_at: float = 0.0
    last_ok_at: float = 0.0
    failures_in_a_row: int = 0
    _recent: deque[tuple[bool, float]] = field(default_factory=lambda: deque(maxlen=20))
    since: float = field(default_factory=time.time)
    _born: float = field(default_factory=time.time)

    def median_latency(self) -> float:
        oks = sorted(lat for good, lat in self._recent if good)
        return oks[len(oks) // 2] if oks else float("inf")

    def _set(self, state: State, reason: str) -> bool:
        changed = state != self.state
        if changed:
            self.since = time.time()
        self.state, self.reason = state, reason
        return changed

    def ok(self, latency: float) -> bool:
        """Record a success; True if the state changed."""
        self.failures_in_a_row = 0
        self.last_ok_at = time.time()
        self._recent.append((True, latency))
        oks = [lat for good, lat in self._recent if good]
        fails = sum(1 for good, _ in self._recent if not good)
        slow = sorted(oks)[len(oks) // 2] if oks else 0.0
        if slow > self.slow_seconds:
            return self._set("degraded", f"slow: median request {slow:.1f}s")
        if fails * 4 > len(self._recent):
            return self._set("degraded", f"{fails} of the last {len(self._recent)} requests failed")
        return self._set("healthy", "")

    def failed(self, error: str) -> bool:
        """Record a failure; True if the state changed."""
        self.failures_in_a_row += 1
        self.last_error, self.last_error_at = error, time.time()
        self._recent.append((False, 0.0))
        quiet = time.time() - (self.last_ok_at or self._born)
        if self.failures_in_a_row >= self.down_after or quiet > self.down_seconds:
            return self._set("down", error)
        if self.state == "healthy":
            return self._set("degraded", error)
        return False
