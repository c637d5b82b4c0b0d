"""A standby's warm copy of the volume: the writer's whole segments, applied as they come.

The standby keeps, under its own state directory, what a promotion would
download: every whole segment of the history in `journal/` (byte for byte as
the writer wrote it) and a catalog with every transaction in them applied.
The copy is marked by `standby.json` (the volume header) instead of
`volume.json`, so no manual-mode mount takes it for a writer's journal. A
takeover then downloads only the segments sealed since the last step and
the open segment's tail pieces (docs/format.md §2.7).

Invariants:

- A segment file is written (and fsynced) before the transactions in it are
  applied, and applied in LSN order with no gap; a crash between the two is
  repaired at the next open by applying the local files the catalog lacks.
  Transactions state new values, so applying one twice changes nothing.
- The catalog is touched only on the event loop's thread (the FUSE mount reads
  it there too); decoding happens in a worker thread, and applying yields to
  the loop between transactions in large segments.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vaultsync.engine.catalog import Catalog, StoredChunk
from vaultsync.engine.journal import replace_segment_file
from vaultsync.errors import VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import SEGMENTS, parse_segment_key, segment_key
from vaultsync.format.chunks import Codec
from vaultsync.format.crypto import VolumeKeys
from vaultsync.format.header import VolumeHeader
from vaultsync.format.state_layout import StateDir
from vaultsync.format.txn import (
    DropDirent,
    DropInode,
    SetBlocks,
    SetDirent,
    SetInode,
    Transaction,
)
from vaultsync.points.recovery import (
    PointSpec,
    Rebuilt,
    SegmentCache,
    rebuild,
    segment_transactions,
)
from vaultsync.store.objectstore import ObjectStore

log = logging.getLogger("vaultsync.standby")

APPLY_SLICE = 200  # transactions applied between two yields to the event loop


@dataclass
class Touched:
    """What applied transactions changed, for the kernel's caches."""

    inodes: set[int] = field(default_factory=set)
    entries: set[tuple[int, bytes]] = field(default_factory=set)

    def note(self, txn: Transaction) -> None:
        for op in txn.ops:
            if isinstance(op, SetDirent | DropDirent):
                self.entries.add((op.parent, op.name))
                self.inodes.add(op.parent)
            elif isinstance(op, SetInode | DropInode | SetBlocks) or hasattr(op, "ino"):
                self.inodes.add(op.ino)


@dataclass
class Copy:
    """The warm copy as it stands: what the read-only mount serves."""

    header: VolumeHeader
    keys: VolumeKeys | None
    catalog: Catalog
    lsn: int  # newest transaction applied
    time_ns: int  # its commit time
    segno: int  # newest whole segment in journal/

    def rebuilt(self) -> Rebuilt:
        return Rebuilt(self.header, self.catalog, self.lsn, self.time_ns)


class Follower:
    """Keeps the warm copy in `state_dir` up with one data target's history."""

    def __init__(
        self,
        state_dir: Path,
        passphrase: str | None,
        volume_name: str,
        on_applied: Callable[[Touched], None] = lambda t: None,
    ) -> None:
        self.dirs = StateDir(state_dir)
        self.passphrase = passphrase
        self.volume_name = volume_name
        self.on_applied = on_applied
        self.copy: Copy | None = None
        self.cache = SegmentCache(self.dirs.journal, limit=1 << 62)

    # -- opening -------------------------------------------------------------------
    async def open(self, source: ObjectStore) -> Copy:
        """The copy there is (repaired after a crash), or a new one from `source`."""
        if self.dirs.standby.exists() and self.dirs.catalog.exists():
            self.copy = await self._resume()
        else:
            self.copy = await self._bootstrap(source)
        return self.copy

    async def _bootstrap(self, source: ObjectStore) -> Copy:
        log.info("this site has no copy of the volume: downloading it from %s", source.name)
        t0 = time.monotonic()
        shutil.rmtree(self.dirs.journal, ignore_errors=True)
        self.dirs.journal.mkdir(parents=True)
        rebuilt, keys = await rebuild(
            source,
            self.dirs.root,
            self.passphrase,
            PointSpec(),
            self.cache,
            use_checkpoint=False,
            volume_name=self.volume_name,
            tails=False,
        )
        cat = rebuilt.catalog
        for segno in rebuilt.segments:
            data = await asyncio.to_thread(self.cache.path(segno).read_bytes)
            self._note(cat, segno, data)
        cat.set_meta("volume_id", rebuilt.header.volume_id_hex)
        cat.commit()
        self.dirs.standby.write_bytes(rebuilt.header.to_bytes())
        log.info(
            "downloaded %d segment(s) up to LSN %d in %.1fs",
            len(rebuilt.segments),
            rebuilt.lsn,
            time.monotonic() - t0,
        )
        top = max(rebuilt.segments, default=0)
        return Copy(rebuilt.header, keys, cat, rebuilt.lsn, rebuilt.time_ns, top)

    async def _resume(self) -> Copy:
        header = VolumeHeader.from_bytes(self.dirs.standby.read_bytes(), str(self.dirs.standby))
        keys = header.unlock(self.passphrase)
        cat = Catalog.open(self.dirs.catalog)
        codec = Codec(header.compression_level, keys)
        noted = max((s.segno for s in cat.sealed_segments()), default=0)
        files = sorted(
            n for p in self.dirs.journal.glob("*.seg") if (n := _segno_of(p.name)) is not None
        )
        copy = Copy(header, keys, cat, cat.last_lsn(), 0, noted)
        for segno in (n for n in files if n > noted):
            # A crash between a file and its transactions: apply them now.
            data = await asyncio.to_thread(self.cache.path(segno).read_bytes)
            await self._apply(copy, codec, segno, data, f"local segment {segno}")
            copy.segno = segno
        log.info("resumed the standby's copy at LSN %d (segment %d)", copy.lsn, copy.segno)
        return copy

    # -- following -------------------------------------------------------------------
    async def step(self, source: ObjectStore) -> int:
        """Apply the whole segments `source` holds after the copy's; how many were new."""
        copy = self.copy
        assert copy is not None
        codec = Codec(copy.header.compression_level, copy.keys)
        done = 0
        after = segment_key(copy.segno) if copy.segno else ""
        async for o in source.list(SEGMENTS, start_after=after):
            segno = parse_segment_key(o.key)
            if segno is None:
                continue
            if segno != copy.segno + 1:
                raise VolumeError(
                    f"target {source.name!r} holds segment {segno} after {copy.segno}: a gap "
                    "in the history (garbage collection); the standby downloads it afresh"
                )
            data = await source.get(o.key)
            await asyncio.to_thread(replace_segment_file, self.cache.path(segno), data)
            await self._apply(copy, codec, segno, data, f"target {source.name!r} segment {segno}")
            copy.segno = segno
            done += 1
        return done

    async def apply_local(self, copy: Copy, codec: Codec, segno: int, data: bytes) -> None:
        """Apply segment `segno`, already written to the copy's journal, as the next one."""
        await self._apply(copy, codec, segno, data, f"local segment {segno}")
        copy.segno = segno

    async def _apply(self, copy: Copy, codec: Codec, segno: int, data: bytes, where: str) -> None:
        def decode() -> list[tuple[seg.Record, list[StoredChunk], Transaction]]:
            return [
                (rec, chunks, Transaction.decode(codec.decode_txn(rec)))
                for rec, chunks in segment_transactions(data, segno, copy.header, where, True)
                if rec.lsn > copy.lsn
            ]

        txns = await asyncio.to_thread(decode)
        touched = Touched()
        for i, (rec, chunks, txn) in enumerate(txns):
            if rec.lsn != copy.lsn + 1:
                raise VolumeError(f"{where}: LSN {rec.lsn} follows {copy.lsn}: history has a gap")
            copy.catalog.apply(rec.lsn, txn, chunks)
            copy.lsn, copy.time_ns = rec.lsn, rec.time_ns
            touched.note(txn)
            if i % APPLY_SLICE == APPLY_SLICE - 1:
                await asyncio.sleep(0)
        self._note(copy.catalog, segno, data)
        copy.catalog.commit()
        if txns:
            self.on_applied(touched)

    def _note(self, cat: Catalog, segno: int, data: bytes) -> None:
        """Record segment `segno` as sealed in the catalog, as the writer's catalog has it."""
        lsns = [
            r.lsn
            for _o, r in seg.scan_segment(data, str(segno)).records
            if r.type is seg.RecordType.TXN
        ]
        first, last = min(lsns, default=None), max(lsns, default=None)
        cat.note_segment(segno, len(data), first, last, time.time_ns())


def _segno_of(name: str) -> int | None:
    try:
        return int(name.removesuffix(".seg"), 16) if name.endswith(".seg") else None
    except ValueError:
        return None
