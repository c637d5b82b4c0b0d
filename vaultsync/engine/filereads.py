"""Reading file contents: the decoded-chunk cache, read-ahead, read and stream.

`FileReads` is the bottom of `FileSystem`'s three layers (filesystem.py, the
namespace, over filewrites.py, the write buffers, over this): base classes of
one object, so a read reaches its method with no hop through another.

A block is read from the file's write buffer when it holds the block (dirty,
or in flight to the journal: `FileData.peek`), else from the chunk the
catalog's block map names, through the chunk cache. A block written without
its stored bytes (FileData's *unloaded* blocks) gets them (`_load_bases`)
before anyone reads the whole of it.

Invariants kept here:

- A chunk's content never changes (its id is its hash), so a cached chunk
  never goes stale and a read holding an older block map may still fetch by
  its ids; only memory bounds the cache.
- `_warm` (the way reads and read-ahead fill the cache) fetches a chunk once
  however many want it at the same time: `_fetching` holds a chunk on its way
  in, and the others wait for that fetch. One read-ahead per file at a time
  (`_prefetching`).
"""

from __future__ import annotations

import asyncio
import errno
import stat
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine, Iterable
from typing import Any

from vaultsync.engine.catalog import Catalog, Inode
from vaultsync.engine.filedata import FileData
from vaultsync.engine.posix import FsError
from vaultsync.engine.served import ServedVolume


class ChunkCache:
    """Bounded LRU of decoded chunks, by id: reads of hot blocks skip decompression."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, cid: bytes) -> bytes | None:
        v = self._d.get(cid)
        if v is not None:
            self._d.move_to_end(cid)
        return v

    def put(self, cid: bytes, data: bytes) -> None:
        if len(data) > self.limit // 4 or cid in self._d:
            return
        self._d[cid] = data
        self.size += len(data)
        while self.size > self.limit:
            _, old = self._d.popitem(last=False)
            self.size -= len(old)


class FileReads(ABC):
    """The reading part of `FileSystem`, which supplies its state and `getattr`; never
    made on its own."""

    # The state these methods share with the rest of FileSystem, which sets (and
    # explains) it in its __init__.
    vol: ServedVolume
    cat: Catalog
    block_size: int
    cache: ChunkCache
    files: dict[int, FileData]
    _background: set[asyncio.Future[None]]
    _read_end: dict[int, int]
    _fetching: dict[bytes, asyncio.Future[None]]
    _prefetching: set[int]

    @abstractmethod
    def getattr(self, ino: int) -> Inode:
        """The namespace's (FileSystem): the catalog's attributes, with the size and
        times of the file's unflushed writes over them."""

    READ_AHEAD_BLOCKS = 64

    async def _warm(
        self, ino: int, first: int, last: int, remap: bool = True
    ) -> dict[int, tuple[bytes, int]]:
        """Bring the stored blocks first..last into the chunk cache in one trip.

        Returns the catalog's map of those blocks as it is when this returns
        (unless not `remap`: then as it was when it began).
        """
        buf = self.files.get(ino)
        gen = self.cat.blocks_gen
        stored = self.cat.block_range(ino, first, last)
        want: dict[bytes, None] = {}
        fetching: set[asyncio.Future[None]] = set()
        for b, (cid, _n) in sorted(stored.items()):
            if self.cache.get(cid) is not None or (buf is not None and buf.peek(b) is not None):
                continue
            other = self._fetching.get(cid)
            if other is not None:
                fetching.add(other)  # a read-ahead is bringing it: wait, do not fetch twice
            else:
                want[cid] = None
        if not want and not fetching:
            return stored
        if want:
            done = asyncio.get_running_loop().create_future()
            for cid in want:
                self._fetching[cid] = done
            try:
                got = await self.vol.read_chunks(list(want))
                for cid, data in zip(want, got, strict=True):
                    self.cache.put(cid, data)
            finally:
                for cid in want:
                    if self._fetching.get(cid) is done:
                        del self._fetching[cid]
                done.set_result(None)  # waiters go on; a chunk not cached is read singly
        if fetching:
            await asyncio.gather(*(asyncio.shield(f) for f in fetching))
        if not remap or self.cat.blocks_gen == gen:
            return stored
        return self.cat.block_range(ino, first, last)  # it changed meanwhile

    def _read_ahead(self, ino: int, first: int, last: int) -> None:
        if ino in self._prefetching:
            return
        self._prefetching.add(ino)

        async def go() -> None:
            try:
                await self._warm(ino, first, last, remap=False)
            except Exception:
                pass  # only a hint: the read itself reports errors
            finally:
                self._prefetching.discard(ino)

        self._in_background(go())

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on its own, held so it is not collected, its failure consumed: all
        of it is a head start whose errors reach the caller by another road (a failed
        flush leaves its data dirty, and the next fsync or write reports it)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _stored_block(
        self, ino: int, blockno: int, known: dict[int, tuple[bytes, int]] | None = None
    ) -> bytes:
        # `known`: the caller's block map for a range holding this block, or None.
        ref = known.get(blockno) if known is not None else self.cat.block(ino, blockno)
        if ref is None:
            return b""
        cid, length = ref
        data = self.cache.get(cid)
        if data is None:
            data = await self.vol.read_chunk(cid)
            self.cache.put(cid, data)
        return data[:length]

    async def _block(
        self, ino: int, blockno: int, known: dict[int, tuple[bytes, int]] | None = None
    ) -> bytes:
        """Current content of one block (dirty, in flight, or stored); may be short."""
        buf = self.files.get(ino)
        if buf is not None:
            while blockno in buf.unloaded:
                await self._load_bases(buf, [blockno])
            b = buf.peek(blockno)
            if b is not None:
                return b
        return await self._stored_block(ino, blockno, known)

    async def _load_bases(self, buf: FileData, blocks: Iterable[int]) -> None:
        """Put their stored bytes under the writes to these blocks, where unloaded: the
        chunks not cached in one `read_chunks` trip (the volume reads neighbours together)."""
        todo = {b: u for b in blocks if (u := buf.unloaded.get(b)) is not None}
        have: dict[bytes, bytes] = {}
        want: list[bytes] = []
        for u in todo.values():
            if u.cid not in have and u.cid not in want:
                data = self.cache.get(u.cid)
                if data is None:
                    want.append(u.cid)
                else:
                    have[u.cid] = data
        if want:
            have.update(zip(want, await self.vol.read_chunks(want), strict=True))
        for b, u in todo.items():
            if buf.unloaded.get(b) is u:  # else written whole, cut away or loaded meanwhile
                buf.load_base(b, have[u.cid])

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        i = self.getattr(ino)
        if not stat.S_ISREG(i.mode):
            raise FsError(errno.EINVAL if not stat.S_ISDIR(i.mode) else errno.EISDIR)
        end = min(i.size, offset + size)
        if offset >= end:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        # One map for the whole read; a block whose chunk left the cache since is
        # fetched below by that map's chunk id, which is still the block's content
        # as of when the read began. Unless a flush commits meanwhile: the blocks it
        # takes out of the buffer are then only in the new map (see the loop).
        stored = await self._warm(ino, first, last)
        gen = self.cat.blocks_gen
        if self._read_end.get(ino) == offset:  # sequential: fetch ahead, in the background
            self._read_ahead(ino, last + 1, last + self.READ_AHEAD_BLOCKS)
        self._read_end[ino] = end
        parts = []
        pos = offset
        while pos < end:
            b, inner = divmod(pos, bs)
            take = min(bs - inner, end - pos)
            if self.cat.blocks_gen != gen:  # a block flushed while we waited for another
                gen = self.cat.blocks_gen
                stored = self.cat.block_range(ino, first, last)
            data = await self._block(ino, b, stored)
            # A view, not a slice: the join below is then the only copy of the data.
            piece: bytes | memoryview = memoryview(data)[inner : inner + take]
            if len(piece) < take:
                piece = bytes(piece) + bytes(take - len(piece))
            parts.append(piece)
            pos += take
        # The file may have been truncated while we awaited a chunk: never return stale tail.
        size_now = self.getattr(ino).size if ino in self.files or self.cat.inode(ino) else 0
        out = b"".join(parts)
        if offset + len(out) > size_now:
            out = out[: max(0, size_now - offset)]
        return out

    STREAM_BATCH = 8 << 20

    async def stream(self, ino: int) -> AsyncIterator[bytes]:
        """The whole file in order, in pieces of about STREAM_BATCH bytes, for bulk copies.

        `read` serves small random reads through the chunk cache and a read-ahead;
        several bulk copies at once through that path evict each other's
        read-ahead and fetch every chunk many times over. Here each block is
        fetched once, a batch per `read_chunks` call (the volume groups neighbours
        into one read), the next batch while the caller writes this one, and
        nothing goes into the chunk cache. Blocks with unflushed writes come from
        the buffer, as in `read`; a file truncated meanwhile ends early.
        """
        i = self.getattr(ino)
        if not stat.S_ISREG(i.mode):
            raise FsError(errno.EINVAL if not stat.S_ISDIR(i.mode) else errno.EISDIR)
        size, bs = i.size, self.block_size
        per = max(1, self.STREAM_BATCH // bs)
        nblocks = -(-size // bs)

        async def batch(first: int) -> bytes:
            last = min(first + per, nblocks) - 1
            buf = self.files.get(ino)
            while buf is not None and any(b in buf.unloaded for b in range(first, last + 1)):
                await self._load_bases(buf, range(first, last + 1))
            refs = self.cat.block_range(ino, first, last)
            held = {b: buf.peek(b) for b in range(first, last + 1)} if buf is not None else {}
            want = list(dict.fromkeys(ref[0] for b, ref in refs.items() if held.get(b) is None))
            got = dict(zip(want, await self.vol.read_chunks(want), strict=True)) if want else {}
            parts = []
            for b in range(first, last + 1):
                span = min(bs, size - b * bs)
                data = held.get(b)
                if data is None:
                    ref = refs.get(b)
                    data = got[ref[0]][: ref[1]] if ref is not None else b""
                data = data[:span]
                parts.append(data if len(data) == span else data + bytes(span - len(data)))
            return b"".join(parts)

        nxt: asyncio.Future[bytes] | None = asyncio.ensure_future(batch(0)) if nblocks else None
        first = start = 0
        try:
            while nxt is not None:
                data = await nxt
                first += per
                nxt = asyncio.ensure_future(batch(first)) if first < nblocks else None
                now = self.getattr(ino).size if ino in self.files or self.cat.inode(ino) else 0
                piece = data[: max(0, now - start)]
                if piece:
                    yield piece
                if len(piece) < len(data):
                    return  # truncated while we read
                start += len(data)
        finally:
            if nxt is not None:
                nxt.cancel()
                nxt.add_done_callback(lambda f: f.cancelled() or f.exception())
