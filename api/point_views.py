"""Point views: the volume as of a point, rebuilt from a target, kept in a small LRU.

Rebuilding a point replays segments (recovery.rebuild), which costs seconds,
so the last few views are kept and shared by every request that names the
same point. A view in use by a download is never closed under it: eviction
only marks it, and the last user closes it. Rebuilds run one at a time: they
share the segment cache, and two cores serve everyone.

A past LSN never changes, so its view is reused as long as it is cached
(and downloads from it may be cached by HTTP clients: `View.fixed`).
Other points can move, and their views are revalidated at most every
FRESH_SECONDS by something much cheaper than a rebuild:

- "latest", or a time close to now: the target may have received segments.
  The view remembers the target's head (its segment and tail keys) from just
  before the rebuild; if a new listing shows the same head the view is still
  the newest point and is kept, else it is rebuilt. A listing is one or two
  requests; a rebuild downloads and replays segments, so without this check
  a server rebuilt "latest" every few seconds even when nothing changed.
  A time view stays checked this way until its time is FRESH_SECONDS old
  and the head has not moved since it was built: then it is settled (fixed).
- a snapshot name: it can be deleted and made again at another LSN. Its
  LSN is read again (one GET); the view is kept while it is the same.
  Snapshots created or deleted through this API drop the view at once.

In the mount daemon, "latest" is the live head itself: the daemon's own
FileSystem, dirty buffers included, so it is never cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import shutil
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from vaultsync.engine.filesystem import FileSystem
from vaultsync.errors import VaultsyncError
from vaultsync.format.bucket_layout import SEGMENTS, TAILS
from vaultsync.points.recovered import RecoveredVolume
from vaultsync.points.recovery import (
    PointError,
    PointSpec,
    SegmentCache,
    parse_point,
    rebuild,
    snapshot_lsn,
)
from vaultsync.store.objectstore import ObjectStore

from .errors import ApiError

FRESH_SECONDS = 5.0
VIEW_CACHE = 16 << 20  # decoded chunks kept per view
LIVE_WORDS = ("", "latest", "now", "live")


def parse_at(text: str) -> PointSpec:
    """`parse_point`, with what it refuses (`lsn:abc`, year 0) and LSN 0 as a 400, not a 500."""
    try:
        spec = parse_point(text)
    except PointError as e:
        raise ApiError(400, "bad_point", f"at: {e}") from None
    if spec.lsn is not None and spec.lsn < 1:
        raise ApiError(
            400,
            "bad_point",
            f"at={text[:60]!r} is not a point: give an LSN (1 or more, e.g. 1234 or lsn:1234), "
            "an ISO-8601 time, a snapshot name, or nothing for the newest point",
        )
    return spec


@dataclass
class View:
    fs: FileSystem
    lsn: int
    time_ns: int
    live: bool
    volume_id: str
    vol: RecoveredVolume | None = None
    directory: Path | None = None
    head: str | None = None  # the target's head before the rebuild, for a moving point
    fixed: bool = False  # a past LSN or time: what it shows never changes (HTTP may cache it)
    checked: float = field(default_factory=time.monotonic)
    users: int = 0
    evicted: bool = False

    async def close(self) -> None:
        if self.vol is not None:
            await self.vol.close()
        if self.directory is not None:
            await asyncio.to_thread(shutil.rmtree, self.directory, True)


class PointViews:
    def __init__(
        self,
        store: ObjectStore,
        cache_dir: Path,
        passphrase: str | None,
        capacity: int,
        segment_cache_bytes: int = 1 << 30,
        live: FileSystem | None = None,
        volume_name: str | None = None,
    ) -> None:
        self.store = store
        self.volume_name = volume_name
        self.dir = cache_dir
        self.passphrase = passphrase
        self.capacity = capacity
        self.segments = SegmentCache(cache_dir / "segments", segment_cache_bytes)
        self.live = live
        self._views: OrderedDict[PointSpec, View] = OrderedDict()
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self.hits = 0
        self.misses = 0
        self.revalidated = 0

    @staticmethod
    def _moving(spec: PointSpec) -> bool:
        """Whether the state `spec` names can change as the target receives segments."""
        return spec == PointSpec() or (
            spec.time_ns is not None and spec.time_ns > time.time_ns() - FRESH_SECONDS * 1e9
        )

    async def _head(self) -> str:
        """A digest of the target's segment and tail keys: equal digests, same newest state."""
        h = hashlib.sha256()
        for prefix in (SEGMENTS, TAILS):
            async for o in self.store.list(prefix):
                h.update(f"{o.key}\0{o.size}\0{o.etag}\n".encode())
        return h.hexdigest()

    async def _still_valid(self, spec: PointSpec, view: View) -> bool:
        """Whether a cached view still shows what `spec` names (see the module docstring)."""
        if time.monotonic() - view.checked < FRESH_SECONDS:
            return True
        if spec.snapshot is not None:
            try:
                same = await snapshot_lsn(self.store, spec.snapshot) == view.lsn
            except VaultsyncError:
                same = False  # deleted, or unreadable: the rebuild says which, clearly
        elif view.head is not None:  # built while the point could still move
            same = await self._head() == view.head
            if same and not self._moving(spec):
                view.head, view.fixed = None, True  # a time now in the past: settled
        else:
            return True
        if same:
            view.checked = time.monotonic()
            self.revalidated += 1
        return same

    async def acquire(self, at: str | None) -> View:
        """The view for `at` (CLI --at syntax), counted as in use until `release`."""
        text = (at or "").strip()
        if self.live is not None and text in LIVE_WORDS:
            vol = self.live.vol
            if vol.catalog_stale:  # lost changes the journal has (a full disk): see volume.py
                raise ApiError(
                    503,
                    "catalog_failed",
                    "the live volume's catalog could not be written and must be rebuilt: "
                    "remount it; points from the targets are still served",
                )
            return View(self.live, vol.last_lsn, time.time_ns(), True, vol.header.volume_id_hex)
        spec = parse_at(text)
        async with self._lock:
            view = self._views.get(spec)
            if view is not None and await self._still_valid(spec, view):
                self._views.move_to_end(spec)
                self.hits += 1
            else:
                if view is not None:
                    await self._evict(spec)
                self.misses += 1
                view = await self._build(spec)
                self._views[spec] = view
                while len(self._views) > self.capacity:
                    await self._evict(next(iter(self._views)))
            view.users += 1
            return view

    async def release(self, view: View) -> None:
        if view.live:
            return
        view.users -= 1
        if view.evicted and view.users == 0:
            await view.close()

    @contextlib.asynccontextmanager
    async def use(self, at: str | None) -> AsyncIterator[View]:
        view = await self.acquire(at)
        try:
            yield view
        finally:
            await self.release(view)

    async def forget_snapshot(self, name: str) -> None:
        """Drop the view of snapshot `name`: it was just created or deleted here."""
        async with self._lock:
            spec = PointSpec(snapshot=name)
            if spec in self._views:
                await self._evict(spec)

    async def _evict(self, spec: PointSpec) -> None:
        view = self._views.pop(spec)
        view.evicted = True
        if view.users == 0:
            await view.close()

    async def _build(self, spec: PointSpec) -> View:
        where = self.dir / f"point-{next(self._ids)}"
        head = await self._head() if self._moving(spec) else None
        try:
            rebuilt, keys = await rebuild(
                self.store,
                where,
                self.passphrase,
                spec,
                self.segments,
                durable=False,
                volume_name=self.volume_name,
            )
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, where, True)
            raise
        vol = RecoveredVolume(where, rebuilt, keys, self.store, self.segments)
        fs = FileSystem(vol, cache_limit=VIEW_CACHE)
        # Read-ahead fills the chunk cache in one go: a span larger than half the cache
        # (32 blocks of 1 MiB chunks) evicted its own first blocks before they were read,
        # and every block was decoded twice. Keep the span within half the cache.
        span = VIEW_CACHE // 2 // fs.block_size
        fs.READ_AHEAD_BLOCKS = max(1, min(FileSystem.READ_AHEAD_BLOCKS, span))
        fixed = spec.snapshot is None and head is None
        return View(
            fs,
            rebuilt.lsn,
            rebuilt.time_ns,
            False,
            rebuilt.header.volume_id_hex,
            vol,
            where,
            head,
            fixed=fixed,
        )

    @property
    def size(self) -> int:
        return len(self._views)

    async def close(self) -> None:
        async with self._lock:
            for spec in list(self._views):
                await self._evict(spec)
