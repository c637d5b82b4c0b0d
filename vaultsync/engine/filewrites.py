"""Writing file contents: the per-inode write buffers and how they reach the journal.

`FileWrites` is the middle of `FileSystem`'s three layers (filesystem.py,
the namespace, over this, over filereads.py). A write goes into the file's
`FileData` buffer (filedata.py) and is answered; the buffer is committed on
flush, fsync, close (with other files closed meanwhile, `commit_closed`), the
`flush_after` timer, `flush_bytes` of one file, or memory pressure
(`dirty_limit`).

Invariants kept here:

- `dirty_bytes` is the sum of the buffers' dirty bytes: every change to a
  buffer's blocks adds or subtracts what the buffer reports it changed.
- A file's buffer stays in `files` while the file is open or has bytes
  dirty or in flight (`_drop_if_clean`), so getattr and read see them; an
  inode that is dropped takes its buffer with it (`_forget_data`).
- One flush of a file at a time, under the file's lock; a flush of several
  files at once (`_flush_batches`) holds the lock of each.
- A flush never commits a size reaching past bytes it does not commit with
  it, so a crash cannot show zeros where data was written (`_flush_batches`).
- A closed file's content is committed before any later rename or directory
  fsync (FileSystem.rename and sync_dir call `commit_closed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
import weakref
from abc import abstractmethod
from dataclasses import replace

from vaultsync.engine.catalog import Inode
from vaultsync.engine.filedata import PATCH_RANGES, PATCH_SHARE, FileData, Origin
from vaultsync.engine.filereads import FileReads
from vaultsync.engine.posix import MAX_FILE_SIZE, FsError, set_inode
from vaultsync.engine.volume import PreparedChunk
from vaultsync.errors import VaultsyncError, VolumeError
from vaultsync.format.patch import PatchPlan, rebase
from vaultsync.format.txn import Op, SetBlocks, TruncateBlocks


class FileWrites(FileReads):
    """The writing part of `FileSystem`, which supplies its state and `_inode`; never
    made on its own."""

    # The state these methods share with the rest of FileSystem, which sets (and
    # explains) it in its __init__.
    flush_bytes: int
    dirty_limit: int
    flush_after: float
    dirty_bytes: int
    kernel_cmtime: bool
    _open: dict[int, int]
    _locks: weakref.WeakValueDictionary[int, asyncio.Lock]
    _closed: dict[int, None]
    _closed_task: bool
    _closed_lock: asyncio.Lock

    @abstractmethod
    def _inode(self, ino: int) -> Inode:
        """The namespace's (FileSystem): the catalog's inode, or ENOENT."""

    def _ctime(self, buf: FileData, i: Inode) -> int:
        """A buffered ctime wins outright when it is the kernel's (its clock is coarser)."""
        if self.kernel_cmtime and buf.ctime_ns:
            return buf.ctime_ns
        return max(buf.ctime_ns, i.ctime_ns)

    # -- the buffers ---------------------------------------------------------------------
    def _lock(self, ino: int) -> asyncio.Lock:
        lk = self._locks.get(ino)
        if lk is None:
            lk = self._locks[ino] = asyncio.Lock()
        return lk

    def _data(self, ino: int) -> FileData:
        buf = self.files.get(ino)
        if buf is None:
            i = self._inode(ino)
            buf = self.files[ino] = FileData(self.block_size, i.size)
        return buf

    def _forget_data(self, ino: int) -> None:
        buf = self.files.pop(ino, None)
        if buf is not None:
            self.dirty_bytes -= buf.dirty_bytes
        self._locks.pop(ino, None)

    def _drop_if_clean(self, ino: int) -> None:
        """Forget a closed file's buffer once nothing in it is unflushed."""
        buf = self.files.get(ino)
        if buf is None or buf.dirty or buf.inflight or self._open.get(ino, 0):
            return
        del self.files[ino]

    # -- writing and flushing --------------------------------------------------------------
    async def write(self, ino: int, offset: int, data: bytes) -> int:
        if offset < 0:
            raise FsError(errno.EINVAL)
        if offset + len(data) > MAX_FILE_SIZE:
            if offset >= MAX_FILE_SIZE:
                raise FsError(errno.EFBIG)
            data = data[: MAX_FILE_SIZE - offset]  # a short write up to the limit, as ext4
        if self.dirty_bytes > self.dirty_limit:
            # Earlier flushes failed (a full disk): refuse rather than buffer without
            # bound. Raised here, nothing of this write is taken.
            await self.flush_some()
        buf = self._data(ino)
        bs = self.block_size
        pos, view = offset, memoryview(data)
        while view:
            b, inner = divmod(pos, bs)
            take = min(bs - inner, len(view))
            if inner == 0 and take == bs:  # the whole block: nothing of it to keep
                self.dirty_bytes += buf.put_whole(b, view[:take])
                pos += take
                view = view[take:]
                continue
            while not buf.has_dirty(b):
                epoch = buf.epoch
                origin = None
                if b * bs >= buf.stored_size and b not in buf.inflight:
                    # Nothing stored there yet, and no flush holds it: a fresh block.
                    # (A block in flight has content the catalog does not show yet.)
                    base = b""
                elif inner == 0 and b not in buf.inflight and take >= self._stored_len(ino, b):
                    base = b""  # the write replaces everything the block holds
                elif buf.peek(b) is not None:
                    base = await self._block(ino, b)
                else:  # the stored chunk: the block may go back as a patch of it
                    ref = self.cat.block(ino, b)
                    if ref is not None and self.cache.get(ref[0]) is None:
                        # Not in memory: write now, read it when the whole block is
                        # needed, with others (FileData.unloaded). No await since the
                        # loop's test: the block is still not dirty.
                        self.dirty_bytes += buf.start_unloaded(b, ref[0], ref[1])
                        break
                    base = await self._stored_block(ino, b, {b: ref} if ref else {})
                    origin = ref[0] if ref is not None and len(base) == ref[1] else None
                cur = self._data(ino)  # it may have been flushed and dropped meanwhile
                if cur is buf and buf.epoch == epoch:
                    if not buf.has_dirty(b):
                        self.dirty_bytes += buf.start_block(b, base, origin)
                    break
                buf = cur  # a flush or truncate ran while we read: `base` may be stale
            self.dirty_bytes += buf.patch(b, inner, view[:take])
            pos += take
            view = view[take:]
        buf.extend_to(offset + len(data), None if self.kernel_cmtime else time.time_ns())
        touched = range(offset // bs, (offset + max(len(data), 1) - 1) // bs + 1)
        if any(len(buf.unloaded[b].ranges) > PATCH_RANGES for b in touched if b in buf.unloaded):
            await self._load_bases(buf, touched)  # many small writes into one: merge them now
        buf.writes_since_fsync += 1
        if self._kick_due(buf, len(data)):
            with contextlib.suppress(Exception):  # a head start: the fsync reports for itself
                await self.flush(ino)
                self.vol.ship_now()
            return len(data)
        if self.dirty_bytes > self.dirty_limit:
            # This write is taken (buffered): a failure here is reported by the next
            # write, which refuses above, or by the fsync.
            with contextlib.suppress(OSError):
                await self.flush_some()
        elif len(buf.blocks) * bs >= self.flush_bytes:
            lock = self._locks.get(ino)
            if not buf.inflight and not (lock is not None and lock.locked()):
                # None running (it may be reading bases before it takes the blocks): one
                # flush of them all, not a task per write each taking a few.
                self._in_background(self.flush(ino))
            elif len(buf.blocks) * bs >= 2 * self.flush_bytes:
                await self.flush(ino)  # the writer outruns the encoder: make it wait
        return len(data)

    def _stored_len(self, ino: int, blockno: int) -> int:
        ref = self.cat.block(ino, blockno)
        return 0 if ref is None else ref[1]

    async def flush(self, ino: int) -> None:
        """Commit the file's dirty blocks and size (not durable: see fsync)."""
        buf = self.files.get(ino)
        # Blocks in flight belong to a flush that has not committed yet: wait for it
        # (via the lock), or an fsync could return before that data is in the journal.
        if buf is None or (not buf.dirty and not buf.inflight):
            return
        async with self._lock(ino):
            buf = self.files.get(ino)
            if buf is None or not buf.dirty:
                return
            # In batches of FLUSH_BATCH bytes: memory, event-loop stalls and transaction
            # (hence segment) sizes stay bounded however much a file has buffered. Only
            # the blocks dirty now are owed: a busy writer cannot keep an fsync waiting.
            todo = sorted(buf.blocks)
            per_batch = max(1, self.FLUSH_BATCH // self.block_size)
            while True:
                batch, todo = todo[:per_batch], todo[per_batch:]
                await self._flush_batch(ino, buf, batch)
                todo = [b for b in todo if b in buf.blocks]
                if not todo or self.files.get(ino) is not buf:
                    break
            self._drop_if_clean(ino)

    FLUSH_BATCH = 4 << 20
    WARM_AFTER_FLUSH = 1 << 20

    async def _flush_batch(self, ino: int, buf: FileData, batch: list[int]) -> None:
        await self._flush_batches([(ino, buf, batch)])

    async def _flush_batches(self, items: list[tuple[int, FileData, list[int]]]) -> None:
        """Commit these blocks of these files in one transaction; the caller holds the
        lock of each file."""
        while True:
            unloaded = [(buf, b) for _, buf, b in items if any(x in buf.unloaded for x in b)]
            if not unloaded:
                break
            for buf, batch in unloaded:
                await self._load_bases(buf, batch)
        # No await from the test above to here: no block taken is unloaded.
        bs = self.block_size
        taken: list[tuple[int, FileData, dict[int, bytes], dict[int, Origin], int]] = []
        for ino, buf, batch in items:
            snap, origins = buf.take_dirty(batch)
            # The size these blocks make: writes that land while we encode are not in
            # the snapshot, and committing their size now would expose zeros after a
            # crash. Neither may a size reaching past a block still dirty (a later
            # batch's) that lies beyond what is stored: that block would read as a hole
            # after a crash.
            gaps = [
                max(b * bs, buf.stored_size) for b in buf.blocks if (b + 1) * bs > buf.stored_size
            ]
            size = min([buf.size, *gaps])
            self.dirty_bytes -= sum(len(v) for v in snap.values())
            taken.append((ino, buf, snap, origins, size))
        committed = False
        try:
            plans: list[PatchPlan | None] = []
            for _, _, snap, origins, _ in taken:
                if not origins:  # a streaming writer's whole blocks, a new file's
                    plans += [None] * len(snap)
                    continue
                plans += [await self._patch_plan(origins.get(b), d) for b, d in snap.items()]
            data = [d for _, _, snap, _, _ in taken for d in snap.values()]
            prepared = await self.vol.prepare_chunks(data, plans)
            ops: list[Op] = []
            chunks: list[PreparedChunk] = []
            kept: list[tuple[FileData, dict[int, bytes], int, list[PreparedChunk]]] = []
            k = 0
            for ino, buf, snap, _, size in taken:
                mine, k = prepared[k : k + len(snap)], k + len(snap)
                i = self.cat.inode(ino)
                if i is None:
                    continue  # unlinked and released meanwhile: nothing to keep
                blocks = tuple((b, p.id.hex(), p.length) for b, p in zip(snap, mine, strict=True))
                i = replace(
                    i,
                    size=size,
                    mtime_ns=buf.mtime_ns or i.mtime_ns,
                    ctime_ns=self._ctime(buf, i),
                )
                ops += [SetBlocks(ino, blocks), set_inode(i)]
                chunks += mine
                kept.append((buf, snap, size, mine))
            if ops:
                self.vol.commit_nowait(ops, chunks)
            committed = True
            for buf, snap, size, mine in kept:
                buf.stored_size = size
                # The next partial write of these blocks reads them back: keep them warm.
                # Not a streaming writer's full blocks: nobody rewrites them soon, and
                # they would push everything else out of the cache (and hold memory for
                # nothing).
                small = len(snap) * bs <= self.WARM_AFTER_FLUSH
                for d, p in zip(snap.values(), mine, strict=True):
                    if small or len(d) < bs:
                        self.cache.put(p.id, d)
        finally:
            for _, buf, snap, _, _ in taken:
                if committed:
                    buf.done_flushing(snap)
                else:  # keep the data readable and dirty: a later flush retries it
                    self.dirty_bytes += buf.flush_failed(snap)

    async def _patch_plan(self, origin: Origin | None, data: bytes) -> PatchPlan | None:
        """How to store `data` as a patch of the chunk it was loaded from, when that is
        worth it (far fewer bytes than the block); None: store it whole."""
        if origin is None or origin.keep == 0 or not self.vol.writes_patches:
            return None
        plan = PatchPlan(origin.cid, origin.keep, tuple(origin.ranges))
        inner = await self.vol.patch_plan(origin.cid)
        if inner is not None:  # patch the origin's base, never a patch (format §6.3)
            plan = replace(rebase(plan, inner.keep, inner.ranges), base=inner.base)
        small = plan.patched_bytes * 2 <= len(data)
        if not small or plan.patched_bytes * PATCH_SHARE > self.block_size:
            return None
        return plan if len(plan.ranges) <= PATCH_RANGES else None

    async def _truncate(self, ino: int, size: int) -> None:
        """Cut or extend the stored file to `size`; times are the caller's business."""
        await self.flush(ino)
        async with self._lock(ino):
            i = self._inode(ino)
            bs = self.block_size
            ops: list[Op] = []
            keep_blocks = -(-size // bs)
            if size < i.size:
                ops.append(TruncateBlocks(ino, keep_blocks))
                tail = size % bs
                prepared = []
                ref = self.cat.block(ino, size // bs) if tail else None
                if ref is not None:
                    last = await self._stored_block(ino, size // bs, {size // bs: ref})
                    if len(last) > tail:
                        # Cut inside a block: a patch keeping its first `tail` bytes.
                        plan = await self._patch_plan(Origin(ref[0], tail), last[:tail])
                        prepared = await self.vol.prepare_chunks([last[:tail]], [plan])
                        ops.append(SetBlocks(ino, ((size // bs, prepared[0].id.hex(), tail),)))
            else:
                prepared = []
            i = self._inode(ino)
            ops.append(set_inode(replace(i, size=size)))
            self.vol.commit_nowait(ops, prepared)
            buf = self.files.get(ino)
            if buf is not None:
                before = buf.dirty_bytes
                buf.truncated(size)
                self.dirty_bytes -= before - buf.dirty_bytes

    # An application that fsyncs a file after every write (a database's log) pays,
    # before the upload to a sync target can start, the FSYNC request's round trip and
    # the commit. Once that file's last KICK_STREAK fsyncs each followed exactly one
    # write, its next small write is committed and its tail sent before the write is
    # answered: the fsync that follows finds the upload on its way. (Committing first
    # and answering after, not the other way round: the application waits for the
    # upload anyway, and the reply and a background task would only delay its start.)
    # A second write before the fsync breaks the rhythm; nothing changes without sync
    # targets. (Sending data before it is asked to be durable promises nothing more:
    # it is just early.)
    KICK_STREAK = 2
    KICK_MAX = 256 * 1024

    async def fsync(self, ino: int) -> None:
        buf = self.files.get(ino)
        if buf is not None:
            buf.fsync_streak = buf.fsync_streak + 1 if buf.writes_since_fsync == 1 else 0
            buf.writes_since_fsync = 0
        await self.flush(ino)
        await self.vol.sync()

    def _kick_due(self, buf: FileData, size: int) -> bool:
        return (
            buf.fsync_streak >= self.KICK_STREAK
            and buf.writes_since_fsync == 1  # only the first write after an fsync
            and size <= self.KICK_MAX
            and self.vol.replicate_soon is not None
        )

    async def flush_some(self) -> None:
        """Under memory pressure: flush the files holding the most dirty bytes first."""
        for ino in sorted(self.files, key=lambda k: -self.files[k].dirty_bytes):
            if self.dirty_bytes <= self.dirty_limit // 2:
                break
            await self.flush(ino)

    async def flush_old(self) -> None:
        """Timer: commit buffers older than `flush_after` so a crash loses little."""
        cutoff = time.monotonic() - self.flush_after
        for ino in [k for k, f in self.files.items() if f.dirty and f.dirty_since <= cutoff]:
            await self.flush(ino)

    async def flush_all(self) -> None:
        """Commit every buffer and sync; one file that cannot be saved does not stop the
        others from trying (each may fit where the first did not)."""
        failed: list[tuple[int, Exception]] = []
        with contextlib.suppress(OSError, VaultsyncError):
            await self.commit_closed()  # together first; whatever fails is retried below
        for ino in list(self.files):
            try:
                await self.flush(ino)
            except (OSError, VaultsyncError) as e:
                failed.append((ino, e))
        await self.vol.sync()
        if failed:
            inos = ", ".join(str(ino) for ino, _ in failed[:10])
            more = f" and {len(failed) - 10} more" if len(failed) > 10 else ""
            raise VolumeError(
                f"the unsynced changes of {len(failed)} file(s) (inodes {inos}{more}) could "
                f"not be written to the journal: {failed[0][1]}. They were never fsynced; "
                "what was fsynced before is safe"
            )

    # -- closed files ----------------------------------------------------------------------
    # How long the buffers of closed files wait for others to share their transaction.
    CLOSE_COMMIT_DELAY = 0.01

    async def _commit_closed_soon(self) -> None:
        # A failure leaves the data dirty in its buffer: the flush timer (flush_old)
        # retries it like any other, and the next close starts a task again.
        try:
            await asyncio.sleep(self.CLOSE_COMMIT_DELAY)
            await self.commit_closed()
        finally:
            # No await between commit_closed() finding nothing left and this: a close
            # in between would see a task that is about to end and start none.
            self._closed_task = False

    async def commit_closed(self) -> None:
        """Commit the buffers of closed files now: those that fit in one transaction
        together (FLUSH_BATCH bytes), the others each on its own.

        Called by rename and sync_dir too, so that a file written, closed and
        renamed into place is never newer in name than in content.
        """
        async with self._closed_lock:
            await self._commit_closed_now()

    async def _commit_closed_now(self) -> None:
        bs = self.block_size
        while self._closed:
            group: list[tuple[int, FileData, list[int]]] = []
            alone: list[int] = []
            room = self.FLUSH_BATCH
            for ino in list(self._closed):
                buf = self.files.get(ino)
                if buf is None or not buf.dirty:
                    del self._closed[ino]
                    self._drop_if_clean(ino)
                    continue
                need = len(buf.blocks) * bs
                # A lock that exists is held or awaited (they are weak): that file goes
                # through flush(), which waits its turn. The others' locks are made here
                # and free, so taking them below never pauses.
                if buf.inflight or ino in self._locks or need > self.FLUSH_BATCH:
                    del self._closed[ino]
                    alone.append(ino)
                    continue
                if need > room:
                    break  # the next round takes it
                del self._closed[ino]
                room -= need
                group.append((ino, buf, sorted(buf.blocks)))
            locks = [self._lock(ino) for ino, _, _ in group]
            for lk in locks:
                await lk.acquire()  # new and free: returns without a pause
            try:
                if group:
                    await self._flush_batches(group)
            finally:
                for lk in locks:
                    lk.release()
            for ino, _, _ in group:
                self._drop_if_clean(ino)
            for ino in alone:
                await self.flush(ino)
