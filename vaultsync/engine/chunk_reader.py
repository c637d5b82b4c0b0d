"""Reading chunks back: one reader for the live volume and for a point rebuilt from a target.

Two ways in. `read_chunks` serves sequential reads, read-ahead and restores:
one catalog query for every id, then each run of neighbouring records (a file
written in order lies in its segments in order) in one read, checked and
decoded off the event loop. Whatever does not come back whole and verified
that way (a damaged record, one moved by GC, a patch whose base failed) is
read again by `read_chunk`, the careful way, which knows the slow cases and
says what is wrong.

Where segment bytes come from is a `SegmentSource`'s business: the local
journal here (`JournalSource`), or a segment cache in front of a target
(points/recovered.py). The reader decides how the work is cut into reads and
thread hops; the source decides where each byte is found.

INVARIANT: every chunk returned was verified against its id
(`Codec.decode_chunk` with `expect_id`), whichever way it was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

from vaultsync.engine.catalog import Catalog
from vaultsync.engine.journal import Journal, Location
from vaultsync.errors import CryptoError, FormatError, VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.chunks import Codec, PatchNeedsBase

Item = tuple[int, Location]  # (index in the request, where its record is)
Run = tuple[int, int, list[Item]]  # (start, end, items): one read of bytes [start, end)
Patches = list[tuple[int, seg.Record, bytes]]  # (index, patch record, base id)
RemoteRead = Callable[[Location, bytes], Awaitable[bytes]]


def runs(items: Iterable[Item], span: int) -> dict[int, list[Run]]:
    """Per segment, runs of neighbouring (or repeated) records, in offset order.

    A run grows while the next record starts at or before its end and the run
    stays within `span` bytes; a record already inside it (asked for twice) joins
    it whatever its size, and a record longer than `span` is a run of its own.
    """
    by_seg: dict[int, list[Item]] = {}
    for item in items:
        by_seg.setdefault(item[1].segno, []).append(item)
    out: dict[int, list[Run]] = {}
    for segno, group in by_seg.items():
        group.sort(key=lambda it: it[1].offset)
        found: list[Run] = []
        for item in group:
            loc = item[1]
            if found:
                start, end, run = found[-1]
                stop = loc.offset + loc.length
                if start <= loc.offset <= end and (stop <= end or stop - start <= span):
                    found[-1] = (start, max(end, stop), [*run, item])
                    continue
            found.append((loc.offset, loc.offset + loc.length, [item]))
        out[segno] = found
    return out


class SegmentSource(ABC):
    """Where a reader finds segment bytes. This base knows no far side: what is not
    on local disk is not anywhere, and a record that fails stays failed."""

    # Records up to this size that are already in memory are decoded on the event
    # loop: for them, the hop to a thread and back costs more than the work.
    inline_read = 0

    @abstractmethod
    def local_file(self, segno: int) -> Path | None:
        """A local file holding segment `segno` at its own offsets, if there is one."""

    def record_now(self, loc: Location) -> seg.Record | None:
        """The record at `loc` if it can be had without waiting for a disk; else None."""
        return None

    @abstractmethod
    def record_here(self, loc: Location) -> seg.Record | None:
        """The record at `loc` from local disk (blocking: called in a worker thread);
        None when this source keeps no local copy of it."""

    async def span_far(self, segno: int, start: int, end: int) -> bytes | None:
        """Bytes [start, end) of a segment not on local disk; None: not there either."""
        return None

    async def record_far(self, loc: Location, cid: bytes) -> seg.Record:
        """The record of chunk `cid`, last seen at `loc`, from wherever it went."""
        raise VolumeError(f"chunk {cid.hex()[:16]}… is in no segment here (segment {loc.segno})")

    async def recover(self, loc: Location, cid: bytes, error: Exception) -> bytes:
        """Chunk `cid` after its careful read failed with `error`: from elsewhere, or raise."""
        raise error


class JournalSource(SegmentSource):
    """The live volume's segments: every one is a file of the local journal.

    A record that cannot be read there (a lost or damaged segment file) is read
    from the targets through `remote()`, the volume's `fetch_remote`, looked up at
    each call because the replicator sets it when it starts and clears it when it
    stops.
    """

    inline_read = 128 * 1024

    def __init__(self, journal: Journal, remote: Callable[[], RemoteRead | None]) -> None:
        self.journal = journal
        self.remote = remote

    def local_file(self, segno: int) -> Path:
        return self.journal.path(segno)

    def record_now(self, loc: Location) -> seg.Record | None:
        return self.journal.read_if_cached(loc)

    def record_here(self, loc: Location) -> seg.Record:
        return self.journal.read(loc)

    async def recover(self, loc: Location, cid: bytes, error: Exception) -> bytes:
        fetch = self.remote()
        if fetch is None:
            raise VolumeError(
                f"chunk {cid.hex()[:16]}… cannot be read from the local journal "
                f"({error}) and no target is configured to read it from"
            ) from error
        # The local copy is gone or bad: the targets hold the same bytes.
        return await fetch(loc, cid)


class ChunkReader:
    """Chunks by id, from the catalog's locations and a source's bytes."""

    RUN_SPAN = 8 << 20  # the most bytes one read of neighbouring records takes

    def __init__(self, catalog: Catalog, codec: Codec, source: SegmentSource) -> None:
        self.catalog = catalog
        self.codec = codec
        self.source = source

    # -- one by one -----------------------------------------------------------------
    async def read_chunk(self, cid: bytes) -> bytes:
        """One chunk, the careful way: every slow case handled, every failure explained."""
        loc = self.catalog.chunk_location(cid)
        if loc is None:
            raise VolumeError(f"chunk {cid.hex()[:16]}… is not in the catalog")
        try:
            rec, data = await self._first_read(loc, cid)
            if data is None:
                # A patch: its base first (an ordinary chunk), then the patch over it,
                # here if the record is small enough to be decoded on the loop.
                base_id = seg.patch_base(rec)
                assert base_id is not None
                base = await self.read_chunk(base_id)
                if rec.size <= self.source.inline_read:
                    return self.codec.decode_chunk(rec, expect_id=cid, base=base)
                return await asyncio.to_thread(self.codec.decode_chunk, rec, cid, base=base)
            return data
        except (OSError, FormatError, CryptoError) as e:
            return await self.source.recover(loc, cid, e)

    def _decoded(self, rec: seg.Record, cid: bytes) -> bytes | None:
        """The chunk in `rec`; None for a patch, which needs its base read first."""
        if seg.patch_base(rec) is not None:
            return None
        return self.codec.decode_chunk(rec, expect_id=cid)

    def _read_here(self, loc: Location, cid: bytes) -> tuple[seg.Record, bytes | None] | None:
        rec = self.source.record_here(loc)
        return None if rec is None else (rec, self._decoded(rec, cid))

    def _in_memory(self, loc: Location) -> seg.Record | None:
        """The record, when it is small and can be had without waiting for a disk."""
        return self.source.record_now(loc) if loc.length <= self.source.inline_read else None

    async def _first_read(self, loc: Location, cid: bytes) -> tuple[seg.Record, bytes | None]:
        """The record and, unless it is a patch, its chunk: decoded here when the record
        is small and in memory, else read and decoded in one worker-thread trip."""
        rec = self._in_memory(loc)
        if rec is not None:
            return rec, self._decoded(rec, cid)
        got = await asyncio.to_thread(self._read_here, loc, cid)
        if got is not None:
            return got
        rec = await self.source.record_far(loc, cid)
        if seg.patch_base(rec) is not None:
            return rec, None
        return rec, await asyncio.to_thread(self.codec.decode_chunk, rec, cid)

    async def record(self, loc: Location, cid: bytes) -> seg.Record:
        """The record of chunk `cid` at `loc`, undecoded, read the cheapest way."""
        rec = self._in_memory(loc)
        if rec is not None:
            return rec
        rec = await asyncio.to_thread(self.source.record_here, loc)
        return rec if rec is not None else await self.source.record_far(loc, cid)

    # -- in batches -----------------------------------------------------------------
    async def read_chunks(self, cids: Sequence[bytes]) -> list[bytes]:
        """Several chunks at once: what a sequential read, read-ahead or a restore asks for.

        Records in local files are read with os.pread, a run at a time, and decoded
        in one worker-thread trip for all of them; the others are fetched from the
        source's far side a run at a time, concurrently, each decoded in a thread.
        """
        found = self.catalog.chunk_locations(cids)
        out: list[bytes | None] = [None] * len(cids)
        patches: Patches = []  # decoded once their bases are read
        files: dict[int, Path | None] = {}
        near: list[Item] = []
        far: list[Item] = []
        for i, c in enumerate(cids):
            loc = found.get(c)
            if loc is None:
                continue  # read_chunk says it is not in the catalog
            if loc.segno not in files:
                files[loc.segno] = self.source.local_file(loc.segno)
            (near if files[loc.segno] is not None else far).append((i, loc))

        def read_near() -> None:
            for segno, seg_runs in runs(near, self.RUN_SPAN).items():
                path = files[segno]
                assert path is not None
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue  # gone meanwhile (evicted, lost): read_chunk deals with these
                try:
                    for start, end, run in seg_runs:
                        try:
                            span = os.pread(fd, end - start, start)
                        except OSError:
                            continue
                        self._decode_run(span, start, run, cids, out, patches)
                finally:
                    os.close(fd)

        async def read_far(segno: int, start: int, end: int, run: list[Item]) -> None:
            span = await self.source.span_far(segno, start, end)
            if span is not None:  # else gone (GC moved it): read_chunk follows it
                await asyncio.to_thread(self._decode_run, span, start, run, cids, out, patches)

        jobs: list[Awaitable[None]] = [
            read_far(segno, start, end, run)
            for segno, seg_runs in runs(far, self.RUN_SPAN).items()
            for start, end, run in seg_runs
        ]
        if near:
            jobs.append(asyncio.to_thread(read_near))
        if len(jobs) == 1:
            await jobs[0]
        elif jobs:
            await asyncio.gather(*jobs)
        if patches:
            await self._decode_patches(patches, cids, out)
        return [
            g if g is not None else await self.read_chunk(c) for g, c in zip(out, cids, strict=True)
        ]

    def _decode_run(
        self,
        span: bytes,
        start: int,
        run: list[Item],
        cids: Sequence[bytes],
        out: list[bytes | None],
        patches: Patches,
    ) -> None:
        """Decode a run's records into `out`; a patch goes to `patches`, and a record
        that fails stays None for read_chunk, which says what is wrong."""
        for i, loc in run:
            raw = span[loc.offset - start : loc.offset - start + loc.length]
            try:
                rec = seg.decode_record(raw, f"segment {loc.segno}@{loc.offset}")
                out[i] = self.codec.decode_chunk(rec, expect_id=cids[i])
            except PatchNeedsBase as p:
                patches.append((i, rec, p.base))
            except (FormatError, CryptoError):
                pass

    async def _decode_patches(
        self, patches: Patches, cids: Sequence[bytes], out: list[bytes | None]
    ) -> None:
        """Decode the patches a batch met into `out`, their bases read in one more batch.
        One that fails stays None: read_chunk reads it again, the way that says why."""
        wanted = list(dict.fromkeys(b for _i, _r, b in patches))
        try:
            bases = dict(zip(wanted, await self.read_chunks(wanted), strict=True))
        except (VolumeError, FormatError, CryptoError, OSError):
            return

        def work() -> None:
            for i, rec, base in patches:
                with contextlib.suppress(FormatError, CryptoError):
                    out[i] = self.codec.decode_chunk(rec, expect_id=cids[i], base=bases[base])

        await asyncio.to_thread(work)
