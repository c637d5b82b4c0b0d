"""The background pool runs its work at a lower priority than the event loop's thread."""

from __future__ import annotations

import os
import threading

from vaultsync.engine.lowprio import NICE, in_background


def _nice_here() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


async def test_background_work_runs_niced_and_returns_its_result() -> None:
    base = _nice_here()
    assert await in_background(_nice_here) == min(19, base + NICE)
    assert await in_background(sum, [1, 2, 3]) == 6
    assert _nice_here() == base, "the caller's own priority is left alone"
