"""A standby that won the next epoch turns its warm copy into the writer's journal.

What a promotion does (control/promote.py), from a copy that is already
there: take the longest history among the data targets this site reaches,
download the whole segments the copy lacks, seal the open segment from its
tail pieces and upload it with a conditional create before anything else (so
that a tail piece the old writer adds later is ignored, §2.2), then record
the new epoch and make the directory a writer's: `volume.json` in place of
`standby.json`. The caller opens it as a `Volume` afterwards.

Only called once the lease is won and takeover_wait has passed (§2.7): the
old writer acknowledged everything it will ever acknowledge before that, so
everything counted at a target is in the listings made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from vaultsync.control.promote import seal_tail
from vaultsync.engine.journal import replace_segment_file
from vaultsync.errors import VolumeError
from vaultsync.format.bucket_layout import (
    SEGMENTS,
    contiguous_end,
    parse_segment_key,
    parse_tail_key,
    segment_key,
    tail_prefix,
)
from vaultsync.format.chunks import Codec
from vaultsync.replication.follower import Follower
from vaultsync.store.objectstore import ObjectStore, StoreError

log = logging.getLogger("vaultsync.standby")


@dataclass
class TakeoverReport:
    source: str
    segments: int  # whole segments downloaded at takeover
    tail_bytes: int  # bytes of tail pieces downloaded and sealed
    lsn: int
    downloaded: int  # bytes in all


async def _top(store: ObjectStore, after: int) -> int:
    top = after
    async for o in store.list(SEGMENTS, start_after=segment_key(after) if after else ""):
        top = max(top, parse_segment_key(o.key) or 0)
    return top


async def _tail(store: ObjectStore, segno: int) -> dict[tuple[int, int], str]:
    pieces: dict[tuple[int, int], str] = {}
    async for o in store.list(tail_prefix(segno)):
        parsed = parse_tail_key(o.key)
        if parsed and parsed[0] == segno:
            pieces[(parsed[1], parsed[2])] = o.key
    return pieces


async def longest_history(stores: list[ObjectStore], after: int) -> tuple[ObjectStore, int]:
    """The reachable data target whose history goes furthest (whole segments, then the
    tail pieces of the next), and its newest whole segment. Every target holds a prefix
    of one history (§2.1), so the longest contains every other."""

    async def reach(store: ObjectStore) -> tuple[int, int] | None:
        try:
            top = await _top(store, after)
            return top, contiguous_end(list(await _tail(store, top + 1)))
        except StoreError as e:
            log.warning("target %s is not reachable for the takeover: %s", store.name, e)
            return None

    found = await asyncio.gather(*(reach(s) for s in stores))
    best = max(
        ((f, s) for f, s in zip(found, stores, strict=True) if f is not None),
        key=lambda fs: fs[0],
        default=None,
    )
    if best is None:
        raise VolumeError("no data target is reachable: the history cannot be continued")
    return best[1], best[0][0]


async def take_over(follower: Follower, stores: list[ObjectStore], epoch: int) -> TakeoverReport:
    """Make the standby's copy the journal of the writer of `epoch` (module docstring)."""
    copy = follower.copy
    assert copy is not None
    source, _top_segno = await longest_history(stores, copy.segno)
    before = copy.segno
    downloaded = 0
    await follower.step(source)
    for n in range(before + 1, copy.segno + 1):
        downloaded += follower.cache.path(n).stat().st_size
    tail_bytes = 0
    nxt = copy.segno + 1
    pieces = await _tail(source, nxt)
    end = contiguous_end(list(pieces))
    if end > 0:
        buf = bytearray()
        for (start, stop), key in sorted(pieces.items()):
            if start > len(buf) or stop <= len(buf):
                continue
            part = await source.get(key)
            buf += part[len(buf) - start :]
            if len(buf) >= end:
                break
        tail_bytes = len(buf)
        where = f"target {source.name!r} tail of segment {nxt}"
        sealed = seal_tail(bytes(buf), copy.header.volume_id, nxt, where)
        if not await source.put_new(segment_key(nxt), sealed):
            # The old writer sealed it first, before it stopped: its version is history.
            sealed = await source.get(segment_key(nxt))
            log.info("segment %d was sealed by the old writer: continuing after it", nxt)
        await asyncio.to_thread(replace_segment_file, follower.cache.path(nxt), sealed)
        codec = Codec(copy.header.compression_level, copy.keys)
        await follower.apply_local(copy, codec, nxt, sealed)
        downloaded += tail_bytes
    cat = copy.catalog
    cat.set_meta("epoch", epoch)
    now = time.time_ns()
    top = copy.segno
    if top:
        row = cat.sealed_segment(top)
        cat.set_watermark(source.name, top, row.last_lsn if row and row.last_lsn else copy.lsn, now)
    cat.commit()
    # volume.json last: its presence means "a complete volume lives here" (a writer's).
    follower.dirs.header.write_bytes(copy.header.to_bytes())
    with contextlib.suppress(FileNotFoundError):
        follower.dirs.standby.unlink()
    return TakeoverReport(source.name, copy.segno - before, tail_bytes, copy.lsn, downloaded)
