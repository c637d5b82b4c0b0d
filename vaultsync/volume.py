"""The local volume: header, journal and catalog kept in step.

Commit protocol (the order is the crash-safety argument):

1. Chunks are hashed, compressed and encrypted off the event loop, before any
   lock is taken (`prepare_chunks`).
2. Under the commit lock: an LSN is assigned; the CHUNK records not already in
   the catalog, then the TXN record, are appended to the journal in one write.
3. For a durable commit the journal is fsynced before anything else happens;
   that is the point where `commit(durable=True)` may be acknowledged.
4. The transaction is applied to the catalog (catalog.py keeps it atomic).

A crash after 2 leaves a journal ahead of the catalog: `open` replays it. A
crash inside 2 leaves a torn tail: the journal cuts it, and since the catalog
had not seen that LSN, nothing that was acknowledged is lost.

Local state directory:
    volume.json   copy of the bucket header (identity and parameters)
    catalog.db    SQLite catalog (catalog.py)
    journal/      segment files (journal.py)
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vaultsync import segment as seg
from vaultsync.catalog import Catalog, StoredChunk
from vaultsync.chunks import Codec
from vaultsync.crypto import VolumeKeys
from vaultsync.errors import VolumeError
from vaultsync.header import HEADER_KEY, VolumeHeader
from vaultsync.journal import Journal, Location, RecoveryReport
from vaultsync.txn import Op, SetInode, Transaction

ROOT_INO = 1
CATALOG_FILE = "catalog.db"
JOURNAL_DIR = "journal"


@dataclass(frozen=True)
class PreparedChunk:
    """A chunk encoded and ready to append; its LSN is filled in at commit."""

    id: bytes
    length: int
    record: seg.Record


def has_volume(state_dir: Path) -> bool:
    return (state_dir / HEADER_KEY).exists()


def read_local_header(state_dir: Path) -> VolumeHeader:
    path = state_dir / HEADER_KEY
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise VolumeError(
            f"{state_dir} holds no volume; run `vaultsync init CONFIG` first"
        ) from None
    return VolumeHeader.from_bytes(raw, str(path))


class Volume:
    def __init__(
        self,
        state_dir: Path,
        header: VolumeHeader,
        keys: VolumeKeys | None,
        catalog: Catalog,
        journal: Journal,
        segment_size: int,
        segment_max_age: float,
    ) -> None:
        self.state_dir = state_dir
        self.header = header
        self.codec = Codec(header.compression_level, keys)
        self.catalog = catalog
        self.journal = journal
        self.segment_size = segment_size
        self.segment_max_age = segment_max_age
        self.recovery = RecoveryReport()
        self.replayed = 0  # transactions re-applied from the journal on open
        self._lock = asyncio.Lock()
        self._next_lsn = journal.last_lsn + 1

    # -- lifecycle ----------------------------------------------------------
    @classmethod
    async def create(
        cls,
        state_dir: Path,
        header: VolumeHeader,
        passphrase: str | None = None,
        *,
        segment_size: int = 32 << 20,
        segment_max_age: float = 2.0,
        now_ns: int | None = None,
    ) -> Volume:
        """Make a new local volume whose first transaction creates the root directory."""
        if has_volume(state_dir):
            raise VolumeError(f"{state_dir} already holds a volume; refusing to overwrite it")
        state_dir.mkdir(parents=True, exist_ok=True)
        if any(state_dir.joinpath(n).exists() for n in (CATALOG_FILE, JOURNAL_DIR)):
            raise VolumeError(
                f"{state_dir} holds a catalog or journal but no volume.json; "
                "move it away or choose another volume.state_dir"
            )
        keys = header.unlock(passphrase)
        tmp = state_dir / (HEADER_KEY + ".tmp")
        tmp.write_bytes(header.to_bytes())
        vol = await cls._assemble(state_dir, header, keys, segment_size, segment_max_age)
        t = now_ns or time.time_ns()
        root = SetInode(
            ino=ROOT_INO,
            mode=stat.S_IFDIR | 0o755,
            nlink=2,
            uid=os.getuid(),
            gid=os.getgid(),
            atime_ns=t,
            mtime_ns=t,
            ctime_ns=t,
        )
        await vol.commit([root], durable=True)
        # volume.json last: its presence means "a complete volume lives here".
        os.replace(tmp, state_dir / HEADER_KEY)
        return vol

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        passphrase: str | None = None,
        *,
        segment_size: int = 32 << 20,
        segment_max_age: float = 2.0,
    ) -> Volume:
        """Open and, after a crash, repair: cut the torn tail, replay what the catalog missed."""
        header = read_local_header(state_dir)
        keys = header.unlock(passphrase)
        vol = await cls._assemble(state_dir, header, keys, segment_size, segment_max_age)
        await vol._replay()
        return vol

    @classmethod
    async def _assemble(
        cls,
        state_dir: Path,
        header: VolumeHeader,
        keys: VolumeKeys | None,
        segment_size: int,
        segment_max_age: float,
    ) -> Volume:
        catalog = await Catalog.open(state_dir / CATALOG_FILE)
        try:
            vid = await catalog.get_meta("volume_id")
            if vid is None:
                await catalog.set_meta("volume_id", header.volume_id_hex)
            elif vid != header.volume_id_hex:
                raise VolumeError(
                    f"{state_dir}: catalog belongs to volume {vid}, header says "
                    f"{header.volume_id_hex}; the state directory is mixed up"
                )
            applied = await catalog.last_lsn()
            journal, report = await asyncio.to_thread(
                Journal.open, state_dir / JOURNAL_DIR, header.volume_id, 0, applied
            )
        except BaseException:
            await catalog.close()
            raise
        vol = cls(state_dir, header, keys, catalog, journal, segment_size, segment_max_age)
        vol.recovery = report
        return vol

    async def _replay(self) -> None:
        applied = await self.catalog.last_lsn()
        pending: list[StoredChunk] = []
        records = await asyncio.to_thread(lambda: list(self.journal.iter_committed(applied)))
        for loc, rec in records:
            if rec.type is seg.RecordType.CHUNK:
                pending.append(StoredChunk(rec.payload[:32], loc, rec.lsn))
            elif rec.type is seg.RecordType.TXN:
                body = await asyncio.to_thread(self.codec.decode_txn, rec)
                await self.catalog.apply(rec.lsn, Transaction.decode(body), pending)
                pending = []
                self.replayed += 1

    async def close(self) -> None:
        async with self._lock:
            await asyncio.to_thread(self.journal.close)
            await self.catalog.close()

    # -- writing ----------------------------------------------------------------
    async def prepare_chunks(self, blocks: Sequence[bytes]) -> list[PreparedChunk]:
        """Hash, compress and encrypt in a worker thread (the libraries release the GIL)."""

        def work() -> list[PreparedChunk]:
            out = []
            for data in blocks:
                cid, rec = self.codec.chunk_record(data, 0, 0)
                out.append(PreparedChunk(cid, len(data), rec))
            return out

        return await asyncio.to_thread(work)

    async def commit(
        self, ops: Iterable[Op], chunks: Sequence[PreparedChunk] = (), durable: bool = False
    ) -> int:
        """Commit one transaction; returns its LSN. See the module docstring for the order."""
        txn = Transaction(tuple(ops))
        body = txn.encode()
        async with self._lock:
            lsn = self._next_lsn
            now = time.time_ns()
            known = await self.catalog.known_chunks(c.id for c in chunks)
            fresh: dict[bytes, PreparedChunk] = {}
            for c in chunks:
                if c.id not in known and c.id not in fresh:
                    fresh[c.id] = c
            records = [replace(c.record, lsn=lsn, time_ns=now) for c in fresh.values()]
            records.append(self.codec.txn_record(body, lsn, now))
            locs = await asyncio.to_thread(self._append, records, durable)
            self._next_lsn = lsn + 1
            stored = [StoredChunk(cid, loc, lsn) for cid, loc in zip(fresh, locs[:-1], strict=True)]
            await self.catalog.apply(lsn, txn, stored)
            if self.journal.size >= self.segment_size:
                await self._seal()
            return lsn

    def _append(self, records: list[seg.Record], durable: bool) -> list[Location]:
        locs = self.journal.append(records)
        if durable:
            self.journal.sync()
        return locs

    async def sync(self) -> None:
        """Make every committed transaction durable in the local journal."""
        async with self._lock:
            await asyncio.to_thread(self.journal.sync)

    async def maybe_seal(self) -> int | None:
        """Seal the open segment if it is old enough and not empty (called by a timer)."""
        async with self._lock:
            age = time.monotonic() - self.journal.opened_at
            if self.journal.records and age >= self.segment_max_age:
                return await self._seal()
            return None

    async def _seal(self) -> int:
        last = self.journal.last_lsn
        segno, first, size = await asyncio.to_thread(self.journal.seal)
        await self.catalog.note_segment(segno, size, first, last, time.time_ns())
        return segno

    # -- reading --------------------------------------------------------------------
    @property
    def last_lsn(self) -> int:
        return self._next_lsn - 1

    async def read_chunk(self, cid: bytes) -> bytes:
        loc = await self.catalog.chunk_location(cid)
        if loc is None:
            raise VolumeError(f"chunk {cid.hex()[:16]}… is not in the catalog")

        def work() -> bytes:
            return self.codec.decode_chunk(self.journal.read(loc), expect_id=cid)

        return await asyncio.to_thread(work)
