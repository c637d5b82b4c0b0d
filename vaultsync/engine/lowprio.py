"""A thread pool for work that must not take CPU from the mount's own requests.

Shipping reads and hashes whole segments, checkpoints encode catalog images,
GC scans segments: useful, never urgent. On a two-core server, done in the
default pool beside a stream of small fsyncs, that work showed up in their
tail latency. Threads of this pool lower their own scheduling priority (nice
+10, which Linux applies per thread), so the kernel runs the event loop and
the encode threads first and this work in what CPU is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

NICE = 10
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):  # best effort: not Linux, or refused
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="vaultsync-bg", initializer=_lower_priority
            )
        return _pool


async def in_background(fn: Callable[..., T], *args: object) -> T:
    """`asyncio.to_thread` for background work: the same, at a lower priority."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(fn, *args))
