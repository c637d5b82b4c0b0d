"""Telling the kernel that a standby's volume changed under it.

A standby applies the writer's transactions to its catalog while its mount
serves readers; the kernel caches attributes, directory entries and pages for
ATTR_TIMEOUT/ENTRY_TIMEOUT seconds, so without a word it would show the old
state that long. After each batch of applied transactions the standby hands
the inodes and directory entries they touched to `Invalidator`, which tells the
kernel to forget them.

Invalidation requests must never be sent from a request handler, nor from the
event loop that serves requests: the kernel may wait for a request of ours
before it answers. They go through one thread of their own, in order.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import threading
from collections.abc import Iterable

log = logging.getLogger("vaultsync.fuse")

_STOP = object()


class Invalidator:
    """A thread that forwards cache invalidations to the kernel, in order."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="invalidate", daemon=True)
        self._thread.start()
        self.sent = 0  # invalidations the kernel accepted (tests and status)

    def changed(self, inodes: Iterable[int], entries: Iterable[tuple[int, bytes]]) -> None:
        """The attributes or contents of `inodes`, and the names `entries` (parent, name),
        are no longer what the kernel may have cached."""
        for parent, name in entries:
            self._q.put(("entry", parent, name))
        for ino in inodes:
            self._q.put(("inode", ino))

    def stop(self, timeout: float = 5.0) -> None:
        self._q.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        import pyfuse3

        while True:
            item = self._q.get()
            if item is _STOP:
                return
            assert isinstance(item, tuple)
            try:
                if item[0] == "entry":
                    pyfuse3.invalidate_entry(item[1], item[2])
                else:
                    pyfuse3.invalidate_inode(item[1], attr_only=False)
                self.sent += 1
            except OSError as e:
                # ENOENT: the kernel never cached it, which is what we wanted anyway.
                if e.errno not in (errno.ENOENT, errno.EBADF):
                    with contextlib.suppress(Exception):
                        log.warning("could not invalidate %s: %s", item[:2], e)
            except Exception:
                log.exception("invalidation of %s failed", item[:2])
