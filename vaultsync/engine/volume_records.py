"""What code outside the engine may ask of a volume's journal and catalog.

Replication, GC and salvage never touch the journal or the catalog
themselves; they go through these methods (replication uses exactly what
engine/replicated.py declares). A base class of `Volume`, kept apart so
that volume.py holds the commit protocol and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vaultsync.engine.catalog import Catalog, SealedSegment
from vaultsync.engine.catalog_image import build_image
from vaultsync.engine.journal import Journal, Location
from vaultsync.engine.lowprio import in_background
from vaultsync.format import segment as seg
from vaultsync.format.chunks import Codec
from vaultsync.format.state_layout import StateDir
from vaultsync.format.txn import ROOT_INO, Transaction


class VolumeRecords:
    """The journal and catalog behind a `Volume`, asked for by name, never reached into."""

    state_dir: Path
    catalog: Catalog
    journal: Journal
    codec: Codec
    committed_at: Callable[[int], int | None]

    @property
    def journal_pos(self) -> tuple[int, int]:
        """(open segment, bytes in it): where the journal is written up to, durable or not
        (`durable_pos` is where it is durable, and catches up at each sync)."""
        return (self.journal.segno, self.journal.size)

    @property
    def everything_sealed(self) -> bool:
        """The open segment holds no record: every committed LSN is in a sealed segment."""
        return not self.journal.records

    def local_segments(self) -> list[int]:
        """The segment files in the local journal, oldest first; the open one is last."""
        return self.journal.segment_numbers()

    def segment_path(self, segno: int) -> Path:
        """Where local segment `segno` is, or was (GC deleted it, or the disk lost it)."""
        return self.journal.path(segno)

    def read_segment(self, segno: int, start: int, end: int | None) -> bytes:
        """Bytes `start`..`end` (None: to the end) of local segment `segno`; blocking. A sealed
        segment never changes; the open one only grows, durable up to `durable_pos`."""
        return self.journal.read_range(segno, start, end)

    def sealed_segments(self) -> list[SealedSegment]:
        """Oldest first. A segment is listed only once the sync that made its last byte
        durable is done (module docstring), so each one listed may be uploaded whole."""
        return self.catalog.sealed_segments()

    def sealed_segment(self, segno: int) -> SealedSegment | None:
        return self.catalog.sealed_segment(segno)

    def watermarks(self) -> dict[str, tuple[int, int, int]]:
        """target -> (newest segment it holds whole, newest LSN it holds, when noted, ns)."""
        return self.catalog.watermarks()

    def set_watermark(self, target: str, segno: int, lsn: int) -> None:
        """`target` acknowledged every segment up to `segno` and every LSN up to `lsn`.
        Noted in the catalog's batch: a crash may lose the newest, which a shipper finds
        again at the target when it resumes."""
        self.catalog.set_watermark(target, segno, lsn, time.time_ns())

    @property
    def checkpoint_lsn(self) -> int:
        """The LSN of the newest checkpoint every target holds (0: none yet)."""
        return int(self.catalog.get_meta("checkpoint_lsn") or 0)

    def advance_checkpoint_lsn(self, lsn: int) -> bool:
        """Every target holds a checkpoint of `lsn`: note it, unless an equal or newer one
        was noted already (the mark never goes back). True when it moved."""
        if lsn <= self.checkpoint_lsn:
            return False
        self.catalog.set_meta("checkpoint_lsn", lsn)
        return True

    async def build_checkpoint(self) -> tuple[int, int, bytes] | None:
        """(LSN, its commit time in ns, the object's bytes) of a checkpoint of the catalog
        as it is now (docs/format.md §2.5); None while nothing is committed. The batch is
        committed first: the image is read from the file through another connection."""
        self.catalog.commit()
        lsn, image = await in_background(build_image, StateDir(self.state_dir).catalog)
        if lsn == 0:
            return None
        when = self.committed_at(lsn) or time.time_ns()
        rec = await in_background(self.codec.checkpoint_record, image, lsn, when)
        return lsn, when, seg.encode_record(rec)

    def decode_checkpoint(self, rec: seg.Record) -> bytes:
        """The catalog image a checkpoint record of this volume holds (see catalog_image.py)."""
        return self.codec.decode_checkpoint(rec)

    def decode_txn(self, rec: seg.Record) -> Transaction:
        return Transaction.decode(self.codec.decode_txn(rec))

    def decode_chunk(self, rec: seg.Record, cid: bytes, base: bytes | None = None) -> bytes:
        """The data of a chunk record, verified to be chunk `cid`; a patch needs its base's."""
        return self.codec.decode_chunk(rec, expect_id=cid, base=base)

    def transactions_after(self, lsn: int) -> Iterable[Transaction]:
        """The committed transactions after `lsn`, oldest first, as the local journal has them."""
        for _loc, rec in self.journal.iter_committed(lsn):
            if rec.type is seg.RecordType.TXN:
                yield self.decode_txn(rec)

    def tree_chunks(self) -> set[bytes]:
        """Every chunk a block of the current tree refers to (not the bases of patches)."""
        return self.catalog.tree_chunks()

    def patch_bases(self) -> list[tuple[bytes, bytes]]:
        """(patch, base) of every patch chunk: a base is live whenever its patch is."""
        return self.catalog.patch_bases()

    def chunks_in(self, segno: int) -> list[tuple[bytes, int, int]]:
        """(id, offset, length) of every chunk whose current copy is in segment `segno`."""
        return self.catalog.chunks_in(segno)

    def chunk_location(self, cid: bytes) -> Location | None:
        return self.catalog.chunk_location(cid)

    def drop_garbage(self, segno: int, ids: Sequence[bytes]) -> int:
        """Forget those of chunks `ids` in segment `segno` that the current tree refers to
        neither directly nor through a patch, so that no new write deduplicates against
        them. Returns how many were forgotten.

        INVARIANT: no chunk the tree needs is dropped. Nothing awaits between the check
        and the drop, so no write comes in between; writes made earlier, while GC was
        deciding, are left out by the caller (`gc_watch`).
        """
        still = self.catalog.referenced(ids)
        return self.catalog.drop_chunks(segno, [c for c in ids if c not in still])

    def forget_segment(self, segno: int) -> None:
        """Segment `segno` is deleted everywhere: it is no longer part of the journal."""
        self.catalog.forget_segment(segno)

    def commit_catalog(self) -> None:
        """Commit the catalog's batch now: GC's decisions become durable and visible."""
        self.catalog.commit()

    def path_of(self, ino: int) -> list[bytes] | None:
        """The names leading from the root to inode `ino` (one way, for a file with hard
        links); None when no entry leads to it."""
        names: list[bytes] = []
        while ino != ROOT_INO:
            link = self.catalog.link_of(ino)
            if link is None or len(names) > 4096:
                return None
            ino, name = link
            names.append(name)
        return names[::-1]
