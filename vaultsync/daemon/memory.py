"""The daemon's memory: glibc's malloc told to give freed buffers back.

Both daemons (writer.py, point.py) call tame_malloc() first thing.
"""

from __future__ import annotations

import logging

log = logging.getLogger("vaultsync.mount")


# glibc's malloc keeps memory it was given back when it can reuse it: after a freed
# buffer of a segment's size it serves every allocation below that size from its
# heaps (the threshold adapts up to 32 MiB), and each worker thread gets a heap of
# its own. A daemon that briefly holds a segment or a flush batch then stays that
# big. Fixed: allocations of 4 MiB or more are mapped, and unmapped when freed;
# two heaps for all threads. Smaller buffers (FUSE requests of 1 MiB) still reuse heap.
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def tame_malloc() -> None:
    """Best effort: only glibc has mallopt, and the daemon works the same without it."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 4 << 20)
        libc.mallopt(_M_ARENA_MAX, 2)
    except (OSError, AttributeError) as e:
        log.debug("malloc left as it is: %s", e)
