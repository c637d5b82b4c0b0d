"""pyfuse3 in asyncio mode, with a cheaper wait for the next request.

pyfuse3's asyncio shim waits for /dev/fuse by creating a future and adding
then removing an epoll reader for every single request. Under a steady
stream of requests (one process doing create, write, fsync, close...) the
next request is usually queued by the time the previous reply is written, so
that dance is pure overhead: measured here on a do-nothing pyfuse3
filesystem it was about half of the daemon's CPU time per file created.

`enable()` switches pyfuse3 to asyncio mode and wraps its wait: a zero-timeout
poll() first; if a request is already waiting, yield to the event loop once
(so timers, shippers and other tasks still run between requests) and go on
without touching epoll. Otherwise wait as pyfuse3 always did. pyfuse3 calls
the wait with its read lock held and reads the request right after it
returns, with no await in between, so no other reader can take the request
this poll saw.

Busy polling. A FUSE request is a round trip between two processes, and each
leg wakes a sleeping one. On virtual machines whose idle CPUs halt (a guest
without halt polling), waking a halted CPU costs far more than serving the
request: a do-nothing pyfuse3 filesystem answered 4,700 stats/s here, and
21,000/s once it kept polling for a while after each reply, because the
application's next request (a stat loop, create-write-fsync-close) comes
within microseconds. So after a request the wait keeps polling, yielding to
the event loop between polls (every other task still runs: an fsync whose
fdatasync finished in a worker thread is answered at once), for at most
`busy_poll` seconds before it sleeps in epoll. An idle mount spends nothing;
a lone request costs at most `busy_poll` of CPU after it. 0 turns it off.

Not while a request is being answered: the reader that pyfuse3 starts beside
a handler that waits (an fsync waiting for its upload) would otherwise spin
on the same thread as that handler's own work (building the upload), and
the next request of a single-threaded application cannot come before the
reply anyway. `running` counts the handlers in progress (operations.py).
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_BUSY_POLL = 200e-6

_busy_poll = DEFAULT_BUSY_POLL


class _Running:
    """How many request handlers are in progress (kept by operations.py's wrapper)."""

    count = 0


running = _Running()
_closing: set[int] = set()  # session descriptors pyfuse3 is closing (terminate)


def enable(busy_poll: float = DEFAULT_BUSY_POLL) -> None:
    import pyfuse3.asyncio as shim

    global _busy_poll
    _busy_poll = max(0.0, busy_poll)  # the last mount's setting (tests mount several)
    _closing.clear()  # a new session: descriptor numbers are reused
    shim.enable()
    original: Callable[[Any], Awaitable[None]] = shim.wait_readable
    if getattr(original, "vaultsync_fast", False):
        return  # already wrapped (a second mount in one process, as tests do)
    poller = select.poll()
    registered: set[int] = set()
    notify_closing: Callable[[Any], None] = shim.notify_closing

    def closing(fd: Any) -> None:
        # pyfuse3.terminate() (SIGTERM, SIGINT) wakes the readers waiting in the
        # original wait; one busy polling is not among them and must see it too, or
        # it would go on to wait for a request that never comes.
        _closing.add(fd)
        notify_closing(fd)

    shim.notify_closing = closing

    async def wait_readable(fd: Any) -> None:
        if fd not in registered:
            poller.register(fd, select.POLLIN)  # only /dev/fuse sessions come here
            registered.add(fd)
        deadline = 0.0
        while True:
            if fd in _closing:
                raise shim.ClosedResourceError()
            ready = poller.poll(0)
            if ready:
                if ready[0][1] != select.POLLIN:
                    break  # an error or hangup: pyfuse3 deals with it
                await asyncio.sleep(0)
                return
            now = time.monotonic()
            if not deadline:
                deadline = now + _busy_poll
            if now >= deadline or running.count:
                break
            await asyncio.sleep(0)
        if fd in _closing:
            raise shim.ClosedResourceError()
        await original(fd)

    wait_readable.vaultsync_fast = True  # type: ignore[attr-defined]
    shim.wait_readable = wait_readable
