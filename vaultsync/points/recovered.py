"""A rebuilt point in time, served read-only through `FileSystem`.

`rebuild` (recovery.py) makes the catalog as of the point; this is the volume
that a point mount, a restore and the API's point views read through it. It
satisfies the engine's `ServedVolume` as the live volume does: chunks come from
the shared `ChunkReader`, and writes are refused with EROFS.

Its segments (`TargetSegments`) are the local segment cache, filled by the
rebuild, in front of the target itself: a segment the cache no longer holds is
read by ranged GETs, and a chunk whose segment GC deleted is followed to where
GC moved it (its relocation record, §2.6).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vaultsync.engine.chunk_reader import ChunkReader, SegmentSource
from vaultsync.engine.journal import Location
from vaultsync.engine.posix import FsError
from vaultsync.engine.volume import PreparedChunk
from vaultsync.errors import VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import segment_key
from vaultsync.format.chunks import Codec
from vaultsync.format.crypto import VolumeKeys
from vaultsync.format.patch import PatchPlan
from vaultsync.format.txn import Op
from vaultsync.points.gc_documents import read_relocation
from vaultsync.points.recovery import Rebuilt, SegmentCache
from vaultsync.store.objectstore import ObjectMissingError, ObjectStore

FETCH_PARALLEL = 4  # ranged GETs of runs in flight per recovered volume
MAX_MOVES = 16  # relocations followed for one chunk before it is called lost


class TargetSegments(SegmentSource):
    """A point's segments: the local cache, else ranged GETs from the target."""

    def __init__(self, store: ObjectStore, cache: SegmentCache) -> None:
        self.store = store
        self.cache = cache
        self._moved: dict[int, dict[bytes, Location]] = {}  # segno -> its relocation record
        self._fetching = asyncio.Semaphore(FETCH_PARALLEL)

    def local_file(self, segno: int) -> Path | None:
        return self.cache.path(segno) if self.cache.has(segno) else None

    def record_here(self, loc: Location) -> seg.Record | None:
        raw = self.cache.read(loc)
        return None if raw is None else self._decode(raw, loc)

    async def span_far(self, segno: int, start: int, end: int) -> bytes | None:
        async with self._fetching:
            try:
                return await self.store.get(segment_key(segno), (start, end))
            except ObjectMissingError:
                return None  # GC moved these chunks: read_chunk follows the relocation

    async def record_far(self, loc: Location, cid: bytes) -> seg.Record:
        for _hop in range(MAX_MOVES):
            try:
                raw = await self.store.get(
                    segment_key(loc.segno), (loc.offset, loc.offset + loc.length)
                )
            except ObjectMissingError:
                # GC deleted that segment after moving the chunk on (§2.6).
                moved = self._moved.get(loc.segno)
                if moved is None:
                    moved = self._moved[loc.segno] = await read_relocation(self.store, loc.segno)
                if cid not in moved:
                    raise
                loc = moved[cid]
                got = await asyncio.to_thread(self.cache.read, loc)
                if got is None:
                    continue
                raw = got
            return self._decode(raw, loc)
        raise VolumeError(f"chunk {cid.hex()[:16]}… was moved too often to follow")

    def _decode(self, raw: bytes, loc: Location) -> seg.Record:
        return seg.decode_record(raw, f"target {self.store.name!r} segment {loc.segno}")


class RecoveredVolume:
    """A rebuilt point: what `FileSystem` needs from a volume (engine/served.py), read-only."""

    def __init__(
        self,
        state_dir: Path,
        rebuilt: Rebuilt,
        keys: VolumeKeys | None,
        store: ObjectStore,
        cache: SegmentCache,
    ) -> None:
        self.state_dir = state_dir
        self.header = rebuilt.header
        self.catalog = rebuilt.catalog
        self.point = rebuilt
        self.last_lsn = rebuilt.lsn
        codec = Codec(rebuilt.header.compression_level, keys)
        self.reader = ChunkReader(self.catalog, codec, TargetSegments(store, cache))
        # A point has no targets to ship to (ServedVolume.replicate_soon).
        self.replicate_soon: Callable[[tuple[int, int], int], None] | None = None

    @property
    def read_only(self) -> bool:
        return True  # a point in time is what it was; it never takes a write

    @property
    def writes_patches(self) -> bool:
        return False

    @property
    def catalog_stale(self) -> bool:
        return self.catalog.stale

    async def read_chunk(self, cid: bytes) -> bytes:
        return await self.reader.read_chunk(cid)

    async def read_chunks(self, cids: Sequence[bytes]) -> list[bytes]:
        return await self.reader.read_chunks(cids)

    # Writing: refused, as a read-only mount refuses it. FileSystem asks for none of
    # these while `read_only` holds; anything that does is told EROFS.
    async def prepare_chunks(
        self, blocks: Sequence[bytes], plans: Sequence[PatchPlan | None] = ()
    ) -> list[PreparedChunk]:
        raise FsError(errno.EROFS)

    async def patch_plan(self, cid: bytes) -> PatchPlan | None:
        raise FsError(errno.EROFS)  # asked only to plan a write

    def commit_nowait(self, ops: Iterable[Op], chunks: Sequence[PreparedChunk] = ()) -> int:
        raise FsError(errno.EROFS)

    async def sync(self) -> None:
        """Nothing to make durable: every transaction of a point is at the target already."""

    def ship_now(self) -> None:
        """Nothing to send."""

    async def close(self) -> None:
        self.catalog.close()
