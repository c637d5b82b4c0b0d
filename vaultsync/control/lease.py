"""The writer lease: which epoch may advance a volume's history (docs/format.md §2.4).

Epoch 0 is the writer that ran `init`; it needs no object. Promotion at another
site creates `lease/<E+1>.json` with a conditional create at every target, so
two promoters can never both win the same epoch. A writer whose epoch is below
the highest lease at a target is *fenced*: it must stop shipping at once.

Leases are also *time-bounded* (§2.4): a listing of `lease/` that found no
higher epoch (a *lease check*) lets the writer count what it uploaded to that
target as held for LEASE_WINDOW seconds after the check began, and a promoter
waits 2 x LEASE_WINDOW after taking the lease before it reads what the old
writer left. That is what makes "an acknowledged fsync is in the new history"
hold without a request on every fsync to learn whether a promoter sealed the
open segment.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from vaultsync.errors import VaultsyncError
from vaultsync.format.bucket_layout import LEASES, lease_key, parse_lease_key
from vaultsync.store.objectstore import ObjectMissingError, ObjectStore

log = logging.getLogger("vaultsync.control.lease")

# Part of the format contract (docs/format.md §2.4): a promoter at another site,
# running another version or another config, must know it. Not configurable.
LEASE_WINDOW = 10.0
# Tests only: a shorter window for the writer and the promoter of one test run
# (both must use the same value, or the promotion is not safe). Never in a config.
TEST_WINDOW_ENV = "VAULTSYNC_TEST_LEASE_WINDOW"

_warned = False


def lease_window() -> float:
    """LEASE_WINDOW, or the test override from the environment (logged once)."""
    global _warned
    raw = os.environ.get(TEST_WINDOW_ENV)
    if not raw:
        return LEASE_WINDOW
    try:
        value = float(raw)
    except ValueError:
        return LEASE_WINDOW
    if not value > 0:
        return LEASE_WINDOW
    if not _warned:
        _warned = True
        log.warning(
            "%s=%s: lease window %.3gs instead of %.3gs (for tests only; a writer and a "
            "promoter with different windows are not safe)",
            TEST_WINDOW_ENV,
            raw,
            value,
            LEASE_WINDOW,
        )
    return value


def lease_clock() -> float:
    """Seconds on the clock lease windows are measured with.

    CLOCK_BOOTTIME, unlike CLOCK_MONOTONIC, keeps counting while the machine is
    suspended: a writer that slept through a promotion must not find its last
    lease check still fresh when it wakes up.
    """
    return time.clock_gettime(_CLOCK)


_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class FencedError(VaultsyncError):
    """Another site holds a newer writer lease: this one must not advance history."""


async def current_epoch(store: ObjectStore) -> int:
    epochs = [parse_lease_key(o.key) async for o in store.list(LEASES)]
    return max((e for e in epochs if e is not None), default=0)


async def check_lease(store: ObjectStore, epoch: int) -> float:
    """One lease check of a writer of `epoch` at `store`: FencedError if a higher epoch
    is there, else the lease_clock() time at which the check *began*.

    The start, not the end, is what the result is good for: the listing was
    answered at some instant after it began, and a lease created after that
    instant may be missing from it, so the check proves only that no newer lease
    existed before it began.
    """
    began = lease_clock()
    newest = await current_epoch(store)
    if newest > epoch:
        raise FencedError(f"target {store.name!r} has a writer lease of epoch {newest}")
    return began


def lease_doc(epoch: int, from_lsn: int, source: str, site: str | None = None) -> dict[str, Any]:
    """The lease of `epoch`; `site` names who takes it (§2.7: the holder of an epoch is
    the site its lease names at a majority of the voters)."""
    return {
        "epoch": epoch,
        "site": site or socket.gethostname(),
        "holder": socket.gethostname(),
        "from_target": source,
        "from_lsn": from_lsn,
        "created_ns": time.time_ns(),
    }


async def take_lease(store: ObjectStore, doc: dict[str, Any]) -> bool:
    """Create the lease of doc["epoch"]; False if someone already holds that epoch."""
    return await store.create_if_absent(lease_key(doc["epoch"]), json.dumps(doc).encode())


async def read_lease(store: ObjectStore, epoch: int) -> dict[str, Any] | None:
    """The lease document of `epoch` at `store`, None if there is none or it is not one."""
    try:
        raw = await store.get(lease_key(epoch))
    except ObjectMissingError:
        return None
    if len(raw) > 4096:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) and doc.get("epoch") == epoch else None
