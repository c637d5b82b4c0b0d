"""The local volume: header, journal and catalog kept in step.

Commit protocol (the order is the crash-safety argument):

1. Chunks are hashed, compressed and encrypted before the commit
   (`prepare_chunks`, in a worker thread for anything but small blocks).
2. `commit_nowait`, on the event-loop thread with no await inside, so it is
   atomic with respect to every other coroutine: an LSN is assigned; the CHUNK
   records not already in the catalog, then the TXN record, are appended to
   the journal in one write(); then the transaction is applied to the catalog.
3. A durable commit then waits for `sync()`: one fsync in a worker thread
   covers every transaction appended before it started (group commit), so
   concurrent fsyncs share the disk's latency. Only then is it acknowledged.

A crash after the write() of 2 leaves a journal at or ahead of the catalog:
`open` replays it. A crash inside the write() leaves a torn tail: the journal
cuts it; the catalog had not seen that LSN, and it was never acknowledged.
A segment is recorded as sealed in the catalog (and so becomes eligible for
upload) only after the sync that made its last byte durable.

Chunks are read back by `reader` (chunk_reader.py); the names of the files in
the state directory are in format/state_layout.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vaultsync.engine.catalog import Catalog, StoredChunk
from vaultsync.engine.chunk_reader import ChunkReader, JournalSource, RemoteRead
from vaultsync.engine.journal import Journal, RecoveryReport
from vaultsync.engine.volume_records import VolumeRecords
from vaultsync.errors import (
    OUT_OF_SPACE,
    CryptoError,
    FormatError,
    ReadOnlyVolumeError,
    VolumeError,
)
from vaultsync.format import segment as seg
from vaultsync.format.chunks import Codec
from vaultsync.format.crypto import VolumeKeys
from vaultsync.format.header import VolumeHeader
from vaultsync.format.patch import PatchPlan
from vaultsync.format.state_layout import HEADER, StateDir
from vaultsync.format.txn import ROOT_INO, Op, SetBlocks, SetInode, Transaction


@dataclass(frozen=True)
class PreparedChunk:
    """A chunk encoded and ready to append; its LSN is filled in at commit."""

    id: bytes
    length: int
    record: seg.Record
    # A patch: the chunk it patches, and the block itself, stored whole instead should
    # the base be gone from the catalog by the commit (GC dropped it meanwhile).
    base: bytes | None = None
    data: bytes | None = None


def has_volume(state_dir: Path) -> bool:
    return StateDir(state_dir).header.exists()


def read_local_header(state_dir: Path) -> VolumeHeader:
    path = StateDir(state_dir).header
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise VolumeError(
            f"{state_dir} holds no volume; run `vaultsync init CONFIG` first"
        ) from None
    return VolumeHeader.from_bytes(raw, str(path))


# Below this many free bytes a write error at the state directory is a full disk
# (SQLite reports one as a "disk I/O error" on some filesystems, not as ENOSPC).
DISK_FULL_BELOW = 1 << 20


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def catalog_reserve(st: os.statvfs_result) -> int:
    """Bytes of the state disk the journal leaves to the catalog (see Volume._check_room)."""
    return min(Volume.RESERVE_MAX, st.f_blocks * st.f_frsize // 16)


def disk_is_full(state_dir: Path, e: BaseException) -> bool:
    """Whether `e` is the state directory's disk running out of space (or quota)."""
    if isinstance(e, OSError) and e.errno in OUT_OF_SPACE:
        return True
    free = free_bytes(state_dir)
    return free is not None and free < DISK_FULL_BELOW


class Volume(VolumeRecords):
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
        self._next_lsn = journal.last_lsn + 1
        self._synced_lsn = self._next_lsn - 1  # everything on disk at open is durable
        self._sync_task: asyncio.Future[None] | None = None
        self._unnoted: list[tuple[int, int | None, int, int]] = []  # sealed, not yet synced
        self._background: set[asyncio.Future[None]] = set()
        self._failed: VolumeError | None = None
        self._failed_fenced = False
        self._room, self._reserve, self._room_at = 0, 0, 0.0  # see _check_room
        # When each recent transaction was committed (LSNs are consecutive, so the
        # LSN indexes it): replication lag in seconds is measured from these.
        self.commit_times: deque[int] = deque(maxlen=1 << 16)
        self.commit_times_first = self._next_lsn
        # Where the journal is durable up to: (open segment number, bytes). Replication
        # ships up to here and no further (docs/format.md §2.2).
        self.durable_pos = (journal.segno, journal.size)
        self.durable_lsn = journal.last_lsn  # the newest LSN at or before durable_pos
        # Called (on the loop) after every sync that made something new durable, with
        # True when it also made segments sealed (what asynchronous shippers wait for).
        self.listeners: list[Callable[[bool], None]] = []
        # Set by the replicator: waits until the synchronous targets hold `durable_pos`.
        self.replicate: Callable[[tuple[int, int], int], Awaitable[None]] | None = None
        # Set by the replicator with `replicate`: have the sync targets start on the
        # journal up to a position now, without waiting (`ship_now`).
        self.replicate_soon: Callable[[tuple[int, int], int], None] | None = None
        # Set by the replicator: read a chunk record from the targets (verified by id).
        self.fetch_remote: RemoteRead | None = None
        self.reader = ChunkReader(
            catalog, self.codec, JournalSource(journal, lambda: self.fetch_remote)
        )
        # While GC decides what is garbage, every chunk id a new transaction refers to
        # is noted here, so that GC never drops a chunk a concurrent write just reused.
        self.gc_watch: set[bytes] | None = None
        self._plans: dict[bytes, PatchPlan] = {}  # patch chunk id -> how it was made

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
        if StateDir(state_dir).catalog.exists() or StateDir(state_dir).journal.exists():
            raise VolumeError(
                f"{state_dir} holds a catalog or journal but no volume.json; "
                "move it away or choose another volume.state_dir"
            )
        keys = header.unlock(passphrase)
        tmp = StateDir(state_dir).header.with_name(HEADER + ".tmp")
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
        os.replace(tmp, StateDir(state_dir).header)
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
        try:
            vol = await cls._assemble(state_dir, header, keys, segment_size, segment_max_age)
            await vol._replay()
        except (OSError, sqlite3.Error) as e:
            if not disk_is_full(state_dir, e):
                raise
            raise VolumeError(
                f"cannot open the volume in {state_dir}: its disk is full "
                f"({free_bytes(state_dir)} bytes free). Free some space there, then try "
                "again"
            ) from e
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
        catalog = Catalog.open(StateDir(state_dir).catalog)
        try:
            vid = catalog.get_meta("volume_id")
            if vid is None:
                catalog.set_meta("volume_id", header.volume_id_hex)
            elif vid != header.volume_id_hex:
                raise VolumeError(
                    f"{state_dir}: catalog belongs to volume {vid}, header says "
                    f"{header.volume_id_hex}; the state directory is mixed up"
                )
            applied = catalog.last_lsn()
            sealed_last = {
                s["segno"]: s["last_lsn"]
                for s in catalog.segments()
                if s["sealed"] and s["last_lsn"] is not None
            }
            epoch = int(catalog.get_meta("epoch") or 0)
            journal, report = await asyncio.to_thread(
                Journal.open,
                StateDir(state_dir).journal,
                header.volume_id,
                epoch,
                applied,
                sealed_last,
            )
        except BaseException:
            catalog.close()
            raise
        vol = cls(state_dir, header, keys, catalog, journal, segment_size, segment_max_age)
        vol.recovery = report
        return vol

    async def _replay(self) -> None:
        applied = self.catalog.last_lsn()
        records = await asyncio.to_thread(lambda: list(self.journal.iter_committed(applied)))
        pending: list[StoredChunk] = []
        for loc, rec in records:
            if rec.type is seg.RecordType.CHUNK:
                pending.append(StoredChunk.of(rec, loc))
            elif rec.type is seg.RecordType.TXN:
                body = self.codec.decode_txn(rec)
                self.catalog.apply(rec.lsn, Transaction.decode(body), pending)
                pending = []
                self.replayed += 1
        self.catalog.commit()
        # Sealed segments the catalog has not recorded (a crash between seal and sync).
        known = {s["segno"] for s in self.catalog.segments() if s["sealed"]}
        for segno in self.journal.segment_numbers()[:-1]:
            if segno not in known:
                first, last, size = await asyncio.to_thread(self.journal.sealed_info, segno)
                self.catalog.note_segment(segno, size, first, last, time.time_ns())

    async def close(self) -> None:
        try:
            await self.sync(replicate=False)
        except VolumeError:
            if self._failed is None:
                raise  # a failed volume closes as far as it can: its journal still syncs
        for t in list(self._background):
            t.cancel()
        await asyncio.to_thread(self.journal.close)
        self.catalog.close()

    # -- writing ----------------------------------------------------------------
    # Below this size a block is encoded inline: a thread hop costs more than the work.
    INLINE_PREPARE = 64 * 1024
    PARALLEL_PREPARE = 1 << 20

    async def prepare_chunks(
        self, blocks: Sequence[bytes], plans: Sequence[PatchPlan | None] = ()
    ) -> list[PreparedChunk]:
        """Hash, compress, encrypt; big work goes to a thread (the libraries release the GIL).

        `plans[i]`, when given and not None, stores block i as a patch of `plan.base`.
        """
        todo = list(zip(blocks, list(plans) + [None] * (len(blocks) - len(plans)), strict=True))

        def work(part: Sequence[tuple[bytes, PatchPlan | None]]) -> list[PreparedChunk]:
            out = []
            for data, plan in part:
                if plan is None:
                    cid, rec = self.codec.chunk_record(data, 0, 0)
                    out.append(PreparedChunk(cid, len(data), rec))
                else:
                    cid, rec = self.codec.patch_record(data, plan, 0, 0)
                    out.append(PreparedChunk(cid, len(data), rec, plan.base, data))
                    self._remember_plan(cid, plan)
            return out

        total = sum(len(b) for b in blocks)
        if total <= self.INLINE_PREPARE:
            return work(todo)
        if total < self.PARALLEL_PREPARE or len(blocks) < 2:
            return await asyncio.to_thread(work, todo)
        # Hashing and compression release the GIL: use the cores.
        half = len(todo) // 2
        a, b = await asyncio.gather(
            asyncio.to_thread(work, todo[:half]), asyncio.to_thread(work, todo[half:])
        )
        return a + b

    @property
    def writes_patches(self) -> bool:
        """Volumes of format version 2 and later may hold patch chunks (§6.3)."""
        return self.header.format_version >= 2

    PLAN_MEMORY = 4096

    def _remember_plan(self, cid: bytes, plan: PatchPlan) -> None:
        # A chunk's content never changes, so neither does what it is relative to its
        # base: a remembered plan stays true whatever happens to the record.
        if len(self._plans) >= self.PLAN_MEMORY:
            self._plans.pop(next(iter(self._plans)))
        self._plans[cid] = plan

    async def patch_plan(self, cid: bytes) -> PatchPlan | None:
        """How chunk `cid` differs from its base, if it is stored as a patch; else None."""
        plan = self._plans.get(cid)
        if plan is not None:
            return plan
        if self.catalog.chunk_base(cid) is None:
            return None  # a whole chunk (the common case: one query)
        loc = self.catalog.chunk_location(cid)
        if loc is None:
            return None
        try:
            base, keep, ranges = self.codec.patch_info(await self.reader.record(loc, cid))
        except (OSError, FormatError, CryptoError):
            return None  # unreadable here: the caller stores the block whole
        plan = PatchPlan(base, keep, tuple(ranges))
        self._remember_plan(cid, plan)
        return plan

    def commit_nowait(
        self, ops: Iterable[Op], chunks: Sequence[PreparedChunk] = (), *, relocate: bool = False
    ) -> int:
        """Append and apply one transaction; durable only after `sync()`. Returns its LSN.

        `relocate` stores `chunks` even when their ids are known: GC compaction moves
        live chunks out of a mostly-garbage segment this way.
        """
        if self.catalog.failed is not None:  # GC's own catalog writes may be the first
            raise self._catalog_failed(self.catalog.failed)
        if self._failed is not None:
            raise self._failed
        txn = Transaction(tuple(ops))
        body = txn.encode()
        lsn = self._next_lsn
        now = time.time_ns()
        # GC's relocations may dip into the reserve: compaction is what gives space back.
        need = len(body) + sum(len(c.record.payload) for c in chunks)
        self._check_room(need, data=bool(chunks) and not relocate)
        if self.gc_watch is not None:
            self.gc_watch.update(c.id for c in chunks)
            self.gc_watch.update(c.base for c in chunks if c.base is not None)
            for op in txn.ops:
                if isinstance(op, SetBlocks):
                    self.gc_watch.update(bytes.fromhex(b[1]) for b in op.blocks if b[1])
        if chunks and not relocate:
            ids = [c.id for c in chunks] + [c.base for c in chunks if c.base is not None]
            known = self.catalog.known_chunks(ids)
        else:
            known = set()
        fresh: dict[bytes, PreparedChunk] = {}
        for c in chunks:
            if c.id in known or c.id in fresh:
                continue
            if c.base is not None and not relocate and c.base not in known:
                # INVARIANT: a patch is stored only while its base is in the catalog
                # (format §6.3: the base precedes it). Gone since the patch was planned:
                # store the block whole, on the spot (rare, and one block).
                assert c.data is not None
                cid, rec = self.codec.chunk_record(c.data, 0, 0)
                c = PreparedChunk(cid, c.length, rec)
            fresh[c.id] = c
        records = [replace(c.record, lsn=lsn, time_ns=now) for c in fresh.values()]
        records.append(self.codec.txn_record(body, lsn, now))
        locs = self.journal.append(records)
        self._room -= sum(loc.length for loc in locs)
        self._next_lsn = lsn + 1
        stored = [StoredChunk.of(r, loc) for r, loc in zip(records[:-1], locs[:-1], strict=True)]
        try:
            self.catalog.apply(lsn, txn, stored)
        except sqlite3.Error as e:
            raise self._catalog_failed(e) from e
        if len(self.commit_times) == self.commit_times.maxlen:
            self.commit_times_first += 1
        self.commit_times.append(now)
        if self.journal.size >= self.segment_size:
            try:
                self._seal_nowait()
            except OSError as e:
                # The transaction stands; only the next segment could not be started (a
                # full disk). The open one grows past its size until a seal succeeds.
                if not disk_is_full(self.state_dir, e):
                    raise
        return lsn

    async def commit(
        self, ops: Iterable[Op], chunks: Sequence[PreparedChunk] = (), durable: bool = False
    ) -> int:
        lsn = self.commit_nowait(ops, chunks)
        if durable:
            await self.sync()
        return lsn

    async def sync(self, replicate: bool = True) -> None:
        """Return once every transaction committed before the call is durable.

        Durable means in the local journal on disk and, unless `replicate` is
        False, stored at the synchronous targets as the replication policy says.
        The local fsync and the upload run at the same time: an fsync costs the
        slower of the two, not their sum.
        """
        if replicate and self.replicate is not None:
            pos, lsn = (self.journal.segno, self.journal.size), self.last_lsn
            # The local part in a task of its own, the upload (nearly always the slower)
            # awaited in this one: when the target acknowledges, this task resumes at
            # once, where gather() would cost two more turns of the loop per fsync.
            local = asyncio.ensure_future(self._sync_local())
            try:
                await self.replicate(pos, lsn)
            except BaseException:
                local.add_done_callback(lambda t: t.cancelled() or t.exception())
                raise
            await local
        else:
            await self._sync_local()

    def ship_now(self) -> None:
        """Start sending what is committed to the synchronous targets, ahead of an fsync
        expected to follow: its wait then finds the upload already on its way. Tail bytes
        may reach a target before they are durable here (docs/format.md §2.2)."""
        if self.replicate_soon is not None:
            self.replicate_soon((self.journal.segno, self.journal.size), self.last_lsn)

    async def _sync_local(self) -> None:
        target = self.last_lsn
        if self._sync_task is not None:
            # That fsync took its work before we were called; ours needs one that starts later.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._sync_task)
        if self._failed is not None:
            raise self._failed
        if self._synced_lsn >= target and not self._unnoted and not self.journal.needs_sync:
            return
        if self._sync_task is None and self._inline_sync():
            # Done on the spot: _sync_once never suspends then, so no other sync can
            # start meanwhile, and a task for it would only cost loop iterations.
            await self._sync_once()
            return
        if self._sync_task is None:
            self._sync_task = asyncio.ensure_future(self._sync_once())
        await asyncio.shield(self._sync_task)

    def _inline_sync(self) -> bool:
        # With sync targets the upload of the same bytes runs on the loop meanwhile:
        # the fdatasync then goes to a thread so that the two overlap.
        return self.journal.small_sync and self.replicate is None

    async def _sync_once(self) -> None:
        upto = self.last_lsn
        sealed, self._unnoted = self._unnoted, []
        pos = (self.journal.segno, self.journal.size)
        inline = self._inline_sync()
        work = self.journal.sync_work()
        try:
            if inline:
                work()  # blocks the loop for one short fdatasync (journal.INLINE_SYNC)
            else:
                await asyncio.to_thread(work)
        except OSError as e:
            # After a failed fsync the kernel may have dropped the dirty pages: nothing
            # written since the last good sync can be promised any more. Stop accepting.
            self._failed = VolumeError(
                f"the local journal could not be written to disk ({e.strerror or e}); "
                "the volume is now read-only. Check the disk, then remount"
            )
            raise self._failed from e
        finally:
            self._sync_task = None
        self._synced_lsn = max(self._synced_lsn, upto)
        # No catalog commit here: the journal is the record, and replay restores what
        # the catalog lost; a SQLite commit per fsync would cost more than the fsync.
        # The mount's timer (maybe_seal) commits a few times a second for other readers.
        if pos > self.durable_pos:
            self.durable_pos, self.durable_lsn = pos, upto
        now = time.time_ns()
        try:
            for segno, first, last, size in sealed:
                self.catalog.note_segment(segno, size, first, last, now)
        except sqlite3.Error as e:
            raise self._catalog_failed(e) from e
        for notify in self.listeners:
            notify(bool(sealed))

    def _seal_nowait(self) -> int:
        last = self.journal.last_lsn
        segno, first, size = self.journal.seal()
        self._unnoted.append((segno, first, last, size))
        task = asyncio.ensure_future(self.sync(replicate=False))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return segno

    async def maybe_seal(self, force: bool = False) -> int | None:
        """Seal the open segment if it is old enough (or `force`) and not empty.

        Called by a timer, which also commits the catalog's batch of applied
        transactions so that other processes (status, verify) see them soon.
        """
        try:
            self.catalog.commit()
        except sqlite3.Error as e:
            raise self._catalog_failed(e) from e
        age = time.monotonic() - self.journal.opened_at
        if self.journal.records and (force or age >= self.segment_max_age):
            segno = self._seal_nowait()
            await self.sync(replicate=False)
            return segno
        return None

    @property
    def epoch(self) -> int:
        """This writer's epoch (docs/format.md §2.4); new segments carry it."""
        return self.journal.epoch

    def _catalog_failed(self, e: sqlite3.Error) -> VolumeError:
        """SQLite refused a write (a full disk): stop taking writes. Nothing is lost: the
        journal holds every transaction, and the next open replays what the catalog lacks."""
        if self._failed is None:
            self._failed = VolumeError(
                f"the catalog in {self.state_dir} could not be written ({e}); the volume "
                f"takes no more writes{' or reads' if self.catalog.stale else ''}. Nothing "
                "fsynced is lost: the journal holds it. Free space on that disk and remount"
            )
        return self._failed

    # Space kept free under the state directory for the catalog: SQLite needs room to
    # commit what the journal took, and a catalog that cannot commit stops the volume.
    # Journal appends carrying data stop short of it (ENOSPC, as ext4 would say); the
    # small metadata-only ones (an unlink, a rename) may use part of it.
    RESERVE_MAX = 64 << 20
    ROOM_RECHECK = 1.0  # seconds between free-space looks while there is plenty

    def _check_room(self, nbytes: int, data: bool) -> None:
        now = time.monotonic()
        if nbytes > self._room or now - self._room_at > self.ROOM_RECHECK:
            try:
                st = os.statvfs(self.state_dir)
            except OSError:
                return
            reserve = catalog_reserve(st)
            self._room = st.f_bavail * st.f_frsize - reserve
            self._room_at = now
            self._reserve = reserve
        if nbytes > self._room + (0 if data else self._reserve * 3 // 4):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.state_dir))

    @property
    def read_only(self) -> bool:
        """No write is accepted any more (fenced, or the journal's disk failed); reads go on."""
        return self._failed is not None

    @property
    def fenced(self) -> bool:
        return self._failed is not None and self._failed_fenced

    def fence(self, reason: str) -> None:
        """Another site now writes this volume: accept no more writes, keep what is local.

        Segments not yet shipped stay in journal/ (the salvage) and are never
        uploaded; reads keep working.
        """
        if self._failed is None:
            self._failed = ReadOnlyVolumeError(
                f"this volume was promoted elsewhere ({reason}); it is read-only here. "
                f"Unshipped writes are kept in {StateDir(self.state_dir).journal} for salvage"
            )
            self._failed_fenced = True

    def committed_at(self, lsn: int) -> int | None:
        """Wall-clock ns when `lsn` was committed, if it was recent enough to be remembered."""
        i = lsn - self.commit_times_first
        if i < 0:
            return self.commit_times[0] if self.commit_times else None
        return self.commit_times[i] if i < len(self.commit_times) else None

    # -- reading --------------------------------------------------------------------
    @property
    def last_lsn(self) -> int:
        return self._next_lsn - 1

    @property
    def catalog_stale(self) -> bool:
        """The catalog lost changes the journal holds (its disk filled): any answer from
        it may be stale, so none is given until a remount replays the journal."""
        return self.catalog.stale

    async def read_chunk(self, cid: bytes) -> bytes:
        return await self.reader.read_chunk(cid)

    async def read_chunks(self, cids: Sequence[bytes]) -> list[bytes]:
        """Several chunks in one go; neighbours in a segment in one read (chunk_reader.py)."""
        return await self.reader.read_chunks(cids)
