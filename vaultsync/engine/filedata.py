"""One open file's unflushed writes: dirty blocks, blocks being flushed, size and times.

Pure bookkeeping, no I/O: `filereads.py` loads the stored base of a block
for a partial write (read-modify-write) and commits on flush.

A block lives in at most one of `blocks` (dirty, written since the last flush
began) and the newest `inflight` snapshot (handed to a flush that has not
committed yet); reads look in `blocks`, then `inflight`, then the catalog, so
a flush in progress never makes data disappear.

A dirty block loaded from a stored chunk also has an `Origin` while its changes
stay small: that chunk, how many of its first bytes the block still holds
(`keep`) and the ranges written since. INVARIANT: the block equals the origin
chunk's first `keep` bytes, zero-extended, with `ranges` of its own bytes over
them, which is what lets the flush store it as a patch (vaultsync/patch.py).

A block whose stored chunk was not in memory when a partial write came is
*unloaded*: the write goes into a placeholder of zeros at once, and the
chunk's bytes are put under it later, when something needs the whole block
(a read, the flush), many blocks in one trip; a random 4 KiB write then costs
no read. INVARIANT: an unloaded block equals `unloaded[b].cid`'s first
`unloaded[b].keep` bytes, zero-extended, with its `ranges` taken from
`blocks[b]`; outside those ranges `blocks[b]` holds nothing yet. `peek`
answers None for it, and `take_dirty` refuses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from vaultsync.format.patch import Range, add_range, clip

# A block whose changes exceed this share of it (or this many ranges) is stored whole.
PATCH_SHARE = 4
PATCH_RANGES = 64


@dataclass
class Origin:
    cid: bytes
    keep: int
    ranges: list[Range] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes written over the origin's (at most PATCH_RANGES ranges: cheap)."""
        return sum(n for _o, n in self.ranges)


class FileData:
    def __init__(self, block_size: int, size: int) -> None:
        self.block_size = block_size
        self.size = size  # logical size including unflushed writes
        self.stored_size = size  # size as the catalog has it
        # A block written whole is kept as the bytes written (bytes() of it is free at
        # flush); a partial write turns it into a bytearray to patch.
        self.blocks: dict[int, bytes | bytearray] = {}
        self.inflight: dict[int, bytes] = {}
        self.origins: dict[int, Origin] = {}  # dirty blocks that may be stored as patches
        self.unloaded: dict[int, Origin] = {}  # dirty blocks still missing their stored bytes
        self.mtime_ns = 0  # 0: unchanged since the catalog's value
        self.ctime_ns = 0
        self.dirty_since = 0.0
        self.size_dirty = False
        # The write-fsync rhythm (filewrites.py ships a write ahead of its fsync).
        self.writes_since_fsync = 0
        self.fsync_streak = 0  # fsyncs in a row that followed exactly one write
        # Bumped whenever a block's stored content may change under a reader (a flush
        # took the dirty blocks, a truncate cut them): a write that loaded a block's base
        # before such a change must load it again, or it would resurrect old bytes.
        self.epoch = 0

    @property
    def dirty(self) -> bool:
        return bool(self.blocks) or self.size_dirty

    @property
    def dirty_bytes(self) -> int:
        return sum(len(b) for b in self.blocks.values())

    def has_dirty(self, blockno: int) -> bool:
        return blockno in self.blocks

    def peek(self, blockno: int) -> bytes | None:
        """The block's bytes if held here; None if not, or not loaded yet (`unloaded`)."""
        if blockno in self.unloaded:
            return None
        b = self.blocks.get(blockno)
        if b is not None:
            return bytes(b)
        return self.inflight.get(blockno)

    def start_block(self, blockno: int, base: bytes, origin: bytes | None = None) -> int:
        """Begin dirtying a block from its current content; returns bytes added.

        `origin`: the id of the stored chunk `base` is the content of (None when it
        is not one: a fresh block, or bytes of a flush still in flight).
        """
        self.blocks[blockno] = bytearray(base)
        if origin is not None:
            self.origins[blockno] = Origin(origin, len(base))
        if not self.dirty_since:
            self.dirty_since = time.monotonic()
        return len(base)

    def start_unloaded(self, blockno: int, cid: bytes, length: int) -> int:
        """Begin dirtying a stored block (`length` bytes of chunk `cid`) without its bytes:
        they come with `load_base`. Returns bytes added."""
        self.blocks[blockno] = bytearray(length)
        self.unloaded[blockno] = Origin(cid, length)
        self.origins[blockno] = Origin(cid, length)
        if not self.dirty_since:
            self.dirty_since = time.monotonic()
        return length

    def load_base(self, blockno: int, chunk: bytes) -> None:
        """Put the stored chunk's bytes under what was written over an unloaded block."""
        u = self.unloaded.pop(blockno)
        written = self.blocks[blockno]
        merged = bytearray(memoryview(chunk)[: u.keep])  # keep <= len(written), always
        merged += memoryview(written)[len(merged) :]
        for off, n in u.ranges:
            merged[off : off + n] = written[off : off + n]
        self.blocks[blockno] = merged
        o = self.origins.get(blockno)
        if o is not None and len(chunk) != o.keep:
            del self.origins[blockno]  # not the whole chunk (cut by a truncate): store it whole

    def put_whole(self, blockno: int, data: memoryview) -> int:
        """A write covering the whole block: its bytes replace whatever it held."""
        old = self.blocks.get(blockno)
        self.blocks[blockno] = bytes(data)
        self.origins.pop(blockno, None)
        self.unloaded.pop(blockno, None)
        if not self.dirty_since:
            self.dirty_since = time.monotonic()
        return len(data) - (len(old) if old is not None else 0)

    def patch(self, blockno: int, offset: int, data: memoryview) -> int:
        """Write into a dirty block (zero-filling a gap); returns bytes the block grew."""
        buf = self.blocks[blockno]
        if isinstance(buf, bytes):
            buf = self.blocks[blockno] = bytearray(buf)
        before = len(buf)
        if offset > before:
            buf.extend(bytes(offset - before))  # past `keep`: zeros in a patch too
        buf[offset : offset + len(data)] = data
        u = self.unloaded.get(blockno)
        if u is not None:
            add_range(u.ranges, offset, len(data))
        o = self.origins.get(blockno)
        if o is not None:
            add_range(o.ranges, offset, len(data))
            if o.size * PATCH_SHARE > self.block_size or len(o.ranges) > PATCH_RANGES:
                del self.origins[blockno]  # too much changed: whole is cheaper to read
        return len(buf) - before

    def extend_to(self, end: int, now_ns: int | None) -> None:
        """A write ended at `end`; `now_ns` stamps mtime and ctime (None: the kernel does)."""
        if end > self.size:
            self.size = end
        self.size_dirty = True
        if now_ns is not None:
            self.mtime_ns = self.ctime_ns = now_ns
        if not self.dirty_since:
            self.dirty_since = time.monotonic()

    def take_dirty(
        self, which: list[int] | None = None
    ) -> tuple[dict[int, bytes], dict[int, Origin]]:
        """Snapshot dirty blocks (all, or `which`) for a flush, with the origins of those
        that may be stored as patches; the blocks stay readable in flight."""
        chosen = list(self.blocks) if which is None else [b for b in which if b in self.blocks]
        if any(b in self.unloaded for b in chosen):
            raise AssertionError("a flush took a block whose stored bytes are not loaded")
        snap = {b: bytes(self.blocks.pop(b)) for b in chosen}
        origins = {b: o for b in chosen if (o := self.origins.pop(b, None)) is not None}
        self.epoch += 1
        self.inflight.update(snap)
        if not self.blocks:
            self.size_dirty = False
            self.dirty_since = 0.0
        return snap, origins

    def done_flushing(self, snap: dict[int, bytes]) -> None:
        for b, data in snap.items():
            if self.inflight.get(b) is data:
                del self.inflight[b]

    def flush_failed(self, snap: dict[int, bytes]) -> int:
        """A flush that did not commit: its blocks are dirty again; returns bytes re-added.

        A block written again since the snapshot was taken already holds the newer
        bytes on top of the snapshot's, so only the others come back.
        """
        added = 0
        for b, data in snap.items():
            if self.inflight.get(b) is data:
                del self.inflight[b]
                if b not in self.blocks:
                    self.blocks[b] = bytearray(data)
                    added += len(data)
        self.size_dirty = True
        if not self.dirty_since:
            self.dirty_since = time.monotonic()
        self.epoch += 1
        return added

    def truncated(self, size: int) -> None:
        """The catalog was just truncated to `size` (after a flush): drop what lies beyond."""
        bs = self.block_size
        self.epoch += 1
        for table in (self.blocks, self.inflight):
            for b in [b for b in table if b * bs >= size]:
                del table[b]
        for origins in (self.origins, self.unloaded):
            for b in [b for b in origins if b * bs >= size]:
                del origins[b]
        last = size // bs
        for table2 in (self.blocks,):
            buf = table2.get(last)
            if buf is not None and len(buf) > size % bs:
                table2[last] = buf[: size % bs]
                for o in (self.origins.get(last), self.unloaded.get(last)):
                    if o is not None:
                        o.keep = min(o.keep, size % bs)
                        o.ranges = clip(o.ranges, size % bs)
        if last in self.inflight and len(self.inflight[last]) > size % bs:
            self.inflight[last] = self.inflight[last][: size % bs]
        self.size = self.stored_size = size
