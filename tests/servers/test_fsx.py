"""File-system exerciser in the style of xfstests' fsx, against a real mount.

Two files on a fresh volume, driven by a seeded generator and compared with an
in-memory model (one bytearray each) after every operation: pwrite at random
offsets and lengths (past EOF, making holes, straddling block and page
boundaries), pread through the writing descriptor, through a second one and
through an O_DIRECT one (which reaches the daemon past the page cache), O_DIRECT
writes, mmap reads (and the zeros past EOF in EOF's page) and MAP_SHARED mmap
writes (msync MS_SYNC, MS_ASYNC or none), truncate and ftruncate up and down (a
cut then a regrow must read zeros in between: the classic stale page-cache
tail), also under a live mapping (xfstests generic/029, 030), fsync and
fdatasync, close and reopen, fallocate in five modes, posix_fallocate,
copy_file_range within a file and between the two, FICLONERANGE, dropping
cached pages (posix_fadvise, now and then the whole machine's page cache) so
that reads come from the daemon, and unmount + remount in the middle of the run
(and every REMOUNT_EVERY steps of a long one).

After every operation each file's size (fstat, lseek SEEK_END) must be the
model's; the whole content is compared every COMPARE_EVERY operations (half the
time with the cached pages dropped), after each remount and at the end, through
fresh descriptors. fallocate, copy_file_range and FICLONERANGE may be refused,
but the first answer for each kind (mode) is the only one allowed afterwards, and
what they do when they work must be what Linux documents. The writeback cache is
on or off by the seed (VAULTSYNC_FSX_WRITEBACK=0/1 forces it).

A failure prints the seed, the block size, the last HISTORY_SHOWN operations and
the first differing offset. Rerun it with VAULTSYNC_FSX_SEED=<seed> (and the same
VAULTSYNC_FSX_STEPS) on the same block size (`-k bs4096`) to replay it;
VAULTSYNC_FSX_MAXLEN makes the files larger (several flush batches).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import random
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.mount.test_filesystem_model import CHUNK_SIZES, KIB, MIB
from tests.support.mounting import Mount
from tests.support.targets import target_block
from vaultsync.commands.local_servers import LocalProvider

DEFAULT_STEPS = 5000  # per block size: the three runs add 35-60 s to CI
SYNC_STEPS = 1500  # with a sync target, where every fsync is a PUT
COMPARE_EVERY = 50
REMOUNT_EVERY = 5000  # besides the one in the middle: long runs remount now and then
HISTORY_SHOWN = 40
NFILES = 2
PAGE = mmap.PAGESIZE

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_MODES = {
    "alloc": 0,
    "keep_size": FALLOC_FL_KEEP_SIZE,
    "punch_hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "zero_range": FALLOC_FL_ZERO_RANGE,
    "zero_range_keep": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
}
FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
MS_ASYNC = 1
MS_SYNC = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.msync.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
_libc.mmap.argtypes += [ctypes.c_int, ctypes.c_int64]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def fallocate(fd: int, mode: int, off: int, length: int) -> None:
    if _libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def msync(m: mmap.mmap, flags: int) -> None:
    """msync(2) with any flags (mmap.flush is MS_SYNC only)."""
    buf = ctypes.c_char.from_buffer(m)
    try:
        if _libc.msync(ctypes.addressof(buf), len(m), flags) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        del buf  # the mmap cannot close while a ctypes view exports it


def eof_page_tail(fd: int, size: int) -> bytes:
    """What a mapping shows past EOF in EOF's page (mmap.mmap refuses to map past EOF)."""
    start = size - size % PAGE
    addr = _libc.mmap(None, PAGE, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    try:
        return ctypes.string_at(addr + size % PAGE, PAGE - size % PAGE)
    finally:
        _libc.munmap(ctypes.c_void_p(addr), PAGE)


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def read_fd(fd: int, size: int) -> bytes:
    """The first `size` bytes through `fd` (and whatever lies past them: a wrong size)."""
    parts: list[bytes] = []
    off = 0
    while True:
        chunk = os.pread(fd, 4 * MIB, off)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        off += len(chunk)
        if off > size + 4 * MIB:
            return b"".join(parts)


class FsxFailure(AssertionError):
    pass


class Fsx:
    def __init__(
        self,
        mount: Mount,
        seed: int,
        steps: int,
        block: int,
        writeback: bool,
        maxlen: int = 0,
        rhythm: bool = False,
    ) -> None:
        self.mount = mount
        # With a sync target: also runs of write+fsync on one file, the rhythm in which
        # the daemon commits and ships a write before answering it (engine/filewrites.py).
        self.rhythm = rhythm
        self.seed = seed
        self.steps = steps
        self.block = block
        self.writeback = writeback
        self.rng = random.Random(seed)
        # Files big enough to span several blocks of any size, small enough to compare often.
        self.maxlen = maxlen or max(256 * KIB, 3 * block + block // 2)
        self.maxop = 64 * KIB
        self.model = [bytearray() for _ in range(NFILES)]
        self.paths = [mount.mountpoint / f"f{i}" for i in range(NFILES)]
        self.fds: list[int] = [-1] * NFILES
        self.reader: tuple[int, int] | None = None  # (file index, a second O_RDONLY fd)
        # O_DIRECT descriptors, opened on first use: their reads go to the daemon.
        self.direct: list[int] = [-1] * NFILES
        self.history: deque[str] = deque(maxlen=HISTORY_SHOWN)
        self.step = 0
        # First answer of each fallocate mode / copy_file_range kind: must never change.
        self.answers: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.remount_at = steps // 2

    # -- reporting -----------------------------------------------------------------
    def log(self, text: str) -> None:
        self.history.append(f"{self.step:6d} {text}")

    def fail(self, what: str) -> None:
        hist = "\n".join(self.history)
        raise FsxFailure(
            f"fsx: {what}\n"
            f"VAULTSYNC_FSX_SEED={self.seed} VAULTSYNC_FSX_STEPS={self.steps} "
            f"(block size {self.block}, writeback_cache={self.writeback}), at step {self.step}\n"
            f"last {len(self.history)} operations:\n{hist}"
        )

    def answer(self, kind: str, outcome: str) -> None:
        """A refusal is fine, a change of mind is not."""
        first = self.answers.setdefault(kind, outcome)
        if first != outcome:
            self.fail(f"{kind} answered {outcome}, earlier {first}")

    # -- descriptors ---------------------------------------------------------------
    def open_all(self) -> None:
        for i, p in enumerate(self.paths):
            self.fds[i] = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)

    def close_all(self) -> None:
        if self.reader is not None:
            os.close(self.reader[1])
            self.reader = None
        for i, fd in enumerate(self.direct):
            if fd >= 0:
                os.close(fd)
                self.direct[i] = -1
        for i, fd in enumerate(self.fds):
            if fd >= 0:
                os.close(fd)
                self.fds[i] = -1

    def close_quietly(self) -> None:
        with contextlib.suppress(OSError):
            self.close_all()

    # -- checks --------------------------------------------------------------------
    def check_size(self, i: int, fd: int | None = None) -> None:
        """fstat, and lseek(SEEK_END) as fsx does; SEEK_HOLE finds EOF's hole at the latest."""
        fd = self.fds[i] if fd is None else fd
        got = os.fstat(fd).st_size
        if got != len(self.model[i]):
            self.fail(f"f{i}: size {got}, expected {len(self.model[i])}")
        end = os.lseek(fd, 0, os.SEEK_END)
        if end != got:
            self.fail(f"f{i}: lseek(SEEK_END) {end}, fstat size {got}")
        if got and not 0 <= os.lseek(fd, 0, os.SEEK_HOLE) <= got:
            self.fail(f"f{i}: lseek(0, SEEK_HOLE) past EOF ({got})")

    def check_data(self, i: int, off: int, got: bytes, what: str) -> None:
        want = bytes(self.model[i][off : off + len(got)])
        if got != want:
            self.fail(f"f{i}: {what} at {off}+{len(got)}: {self.diff(want, got, off)}")

    def diff(self, want: bytes, got: bytes, base: int = 0) -> str:
        """The first differing byte, as a file offset (`base`: where `want` starts)."""
        n = min(len(want), len(got))
        i = next((k for k in range(0, n, 4096) if want[k : k + 4096] != got[k : k + 4096]), n)
        while i < n and want[i] == got[i]:
            i += 1
        at = base + i
        return (
            f"lengths {len(want)} vs {len(got)}, first difference at offset {at} ({at:#x}, "
            f"block {at // self.block} +{at % self.block}): expected {want[i : i + 8].hex()} "
            f"got {got[i : i + 8].hex()}"
        )

    def compare_all(self, why: str, fds: list[int] | None = None) -> None:
        for i in range(NFILES):
            fd = self.fds[i] if fds is None else fds[i]
            want = bytes(self.model[i])
            got = read_fd(fd, len(want))
            if got != want:
                self.fail(f"f{i}: content differs {why}: {self.diff(want, got)}")
            self.check_size(i, fd)
        self.counts["compare"] += 1

    def compare_cold(self, why: str) -> None:
        """Through fresh descriptors after dropping the cached pages: the daemon's bytes."""
        fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        try:
            for fd in fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self.compare_all(why, fds)
        finally:
            for fd in fds:
                os.close(fd)

    # -- random offsets and lengths ---------------------------------------------------
    def offset(self, i: int, past_eof: bool = True) -> int:
        """Uniform, near a block or page boundary, or near EOF."""
        size = len(self.model[i])
        r = self.rng.random()
        if r < 0.4:
            off = self.rng.randrange(self.maxlen)
        elif r < 0.75:
            unit = self.rng.choice((self.block, self.block, PAGE, MIB))
            k = self.rng.randrange(max(1, self.maxlen // unit) + 1)
            off = k * unit + self.rng.randint(-300, 300)
        else:
            off = size + self.rng.randint(-(self.block + 4096), 4096 if past_eof else 0)
        off = max(0, min(off, self.maxlen - 1))
        return off if past_eof or size == 0 else min(off, size - 1)

    def length(self, off: int) -> int:
        r = self.rng.random()
        if r < 0.5:
            n = self.rng.randint(1, 4096)
        elif r < 0.9:
            n = self.rng.randint(1, self.maxop)
        else:  # whole blocks and more
            n = self.rng.randint(self.block // 2, max(2 * self.block + 100, self.maxlen // 4))
        return max(1, min(n, self.maxlen - off))

    def data(self, n: int) -> bytes:
        # Never all zeros: a lost write must not pass for a hole.
        return self.rng.randbytes(n).replace(b"\0", b"\x5a")

    def pick(self) -> int:
        return self.rng.randrange(NFILES)

    # -- model updates ----------------------------------------------------------------
    def m_write(self, i: int, off: int, data: bytes) -> None:
        m = self.model[i]
        if off > len(m):
            m.extend(bytes(off - len(m)))
        m[off : off + len(data)] = data

    def m_truncate(self, i: int, size: int) -> None:
        m = self.model[i]
        if size < len(m):
            del m[size:]
        else:
            m.extend(bytes(size - len(m)))

    # -- operations --------------------------------------------------------------------
    def op_write(self) -> None:
        i = self.pick()
        off = self.offset(i)
        data = self.data(self.length(off))
        self.log(f"write f{i} {off:#x} +{len(data):#x} (size {len(self.model[i]):#x})")
        n = os.pwrite(self.fds[i], data, off)
        if n != len(data):
            self.fail(f"short write {n} of {len(data)}")
        self.m_write(i, off, data)

    def op_read(self) -> None:
        i = self.pick()
        if not self.model[i]:
            return
        off = self.offset(i, past_eof=False)
        n = self.length(off)
        self.log(f"read f{i} {off:#x} +{n:#x}")
        got = os.pread(self.fds[i], n, off)
        if len(got) != min(n, len(self.model[i]) - off):
            self.fail(f"f{i}: read {off}+{n} returned {len(got)} bytes")
        self.check_data(i, off, got, "read")

    def op_read2(self) -> None:
        """Through a second descriptor, opened anew now and then."""
        if self.reader is None or self.rng.random() < 0.2:
            if self.reader is not None:
                os.close(self.reader[1])
            i = self.pick()
            self.reader = (i, os.open(self.paths[i], os.O_RDONLY))
            self.log(f"open reader on f{i}")
        i, fd = self.reader
        if not self.model[i]:
            return
        off = self.offset(i, past_eof=False)
        n = self.length(off)
        self.log(f"read2 f{i} {off:#x} +{n:#x}")
        got = os.pread(fd, n, off)
        if len(got) != min(n, len(self.model[i]) - off):
            self.fail(f"f{i}: read2 {off}+{n} returned {len(got)} bytes")
        self.check_data(i, off, got, "read through a second descriptor")
        if os.fstat(fd).st_size != len(self.model[i]):
            self.fail(f"f{i}: second descriptor's size {os.fstat(fd).st_size}")

    def direct_fd(self, i: int) -> int:
        if self.direct[i] < 0:
            self.direct[i] = os.open(self.paths[i], os.O_RDWR | os.O_DIRECT)
        return self.direct[i]

    def op_dread(self) -> None:
        """O_DIRECT: past the page cache, from the daemon's buffers or its store."""
        i = self.pick()
        if not self.model[i]:
            return
        off = self.offset(i, past_eof=False)
        n = self.length(off)
        self.log(f"O_DIRECT read f{i} {off:#x} +{n:#x}")
        got = os.pread(self.direct_fd(i), n, off)
        if len(got) != min(n, len(self.model[i]) - off):
            self.fail(f"f{i}: O_DIRECT read {off}+{n} returned {len(got)} bytes")
        self.check_data(i, off, got, "O_DIRECT read")

    def op_dwrite(self) -> None:
        i = self.pick()
        off = self.offset(i)
        data = self.data(self.length(off))
        self.log(f"O_DIRECT write f{i} {off:#x} +{len(data):#x} (size {len(self.model[i]):#x})")
        n = os.pwrite(self.direct_fd(i), data, off)
        if n != len(data):
            self.fail(f"short O_DIRECT write {n} of {len(data)}")
        self.m_write(i, off, data)

    def op_mapread(self) -> None:
        i = self.pick()
        size = len(self.model[i])
        if not size:
            return
        off = self.offset(i, past_eof=False)
        n = min(self.length(off), size - off)
        start = off - off % PAGE
        self.log(f"mapread f{i} {off:#x} +{n:#x}")
        with mmap.mmap(
            self.fds[i], off + n - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start
        ) as m:
            got = m[off - start :]
        self.check_data(i, off, got, "mmap read")
        if off + n == size and size % PAGE:  # the rest of EOF's page must read zeros
            tail = eof_page_tail(self.fds[i], size)
            if tail.count(0) != len(tail):
                want = bytes(len(tail))
                self.fail(f"f{i}: mmap past EOF ({size}) not zero: {self.diff(want, tail, size)}")

    def op_mapwrite(self) -> None:
        i = self.pick()
        off = self.offset(i)
        data = self.data(self.length(off))
        end = off + len(data)
        size = len(self.model[i])
        sync = self.rng.choice(("none", "none", "MS_SYNC", "MS_ASYNC"))
        self.log(f"mapwrite f{i} {off:#x} +{len(data):#x} (size {size:#x}) msync {sync}")
        if end > size:  # as fsx: grow the file first, a mapping cannot
            os.ftruncate(self.fds[i], end)
            self.m_truncate(i, end)
        start = off - off % PAGE
        with mmap.mmap(self.fds[i], end - start, mmap.MAP_SHARED, offset=start) as m:
            m[off - start : end - start] = data
            if sync == "MS_SYNC":
                m.flush()
            elif sync == "MS_ASYNC":
                msync(m, MS_ASYNC)
        self.m_write(i, off, data)

    def op_truncate(self) -> None:
        i = self.pick()
        size = len(self.model[i])
        r = self.rng.random()
        if r < 0.4:
            new = self.rng.randrange(self.maxlen)
        elif r < 0.7:
            new = max(0, size - self.rng.randint(1, self.block + 5000))
        else:
            new = min(self.maxlen, size + self.rng.randint(1, self.block + 5000))
        how = self.rng.choice(("ftruncate", "ftruncate", "truncate"))
        self.log(f"{how} f{i} {size:#x} -> {new:#x}")
        if how == "ftruncate":
            os.ftruncate(self.fds[i], new)
        else:
            os.truncate(self.paths[i], new)
        self.m_truncate(i, new)

    def op_truncate_down_up(self) -> None:
        """Cut, then grow again: what lay between must read as zeros, not old bytes."""
        i = self.pick()
        size = len(self.model[i])
        if size < 2:
            return
        low = self.rng.randrange(size)
        high = max(low + 1, min(self.maxlen, size + self.rng.randint(0, self.block)))
        self.log(f"truncate down/up f{i} {size:#x} -> {low:#x} -> {high:#x}")
        os.ftruncate(self.fds[i], low)
        self.m_truncate(i, low)
        self.check_size(i)
        os.ftruncate(self.fds[i], high)
        self.m_truncate(i, high)
        a, b = max(0, low - 10), min(high, size + 10)
        got = os.pread(self.fds[i], b - a, a)
        self.check_data(i, a, got, "read after truncate down and up")

    def op_map_truncate(self) -> None:
        """A mapping kept across a truncate down and up (xfstests generic/029 and 030):
        the pages cut must come back as zeros, in the mapping and in the file."""
        i = self.pick()
        off = self.offset(i)
        n = self.length(off)
        end = off + n
        start = off - off % PAGE
        low = self.rng.randint(start, end - 1)
        high = max(end, len(self.model[i]))
        self.log(f"map, truncate f{i} to {low:#x} then {high:#x} under it, {off:#x} +{n:#x}")
        if end > len(self.model[i]):
            os.ftruncate(self.fds[i], end)
            self.m_truncate(i, end)
        first, second = self.data(n), self.data(n)
        with mmap.mmap(self.fds[i], end - start, mmap.MAP_SHARED, offset=start) as m:
            m[off - start :] = first
            self.m_write(i, off, first)
            os.ftruncate(self.fds[i], low)  # the mapping is not touched while it is shorter
            self.m_truncate(i, low)
            os.ftruncate(self.fds[i], high)
            self.m_truncate(i, high)
            got = m[:]
            self.check_data(i, start, got, "mapping after truncate down and up")
            a = self.rng.randint(off, end - 1)
            b = self.rng.randint(a + 1, end)
            m[a - start : b - start] = second[: b - a]
            self.m_write(i, a, second[: b - a])
            if self.rng.random() < 0.5:
                m.flush()

    def op_fsync(self) -> None:
        i = self.pick()
        how = self.rng.choice(("fsync", "fdatasync"))
        self.log(f"{how} f{i}")
        (os.fsync if how == "fsync" else os.fdatasync)(self.fds[i])

    def op_rhythm(self) -> None:
        """Small writes each followed by an fsync (a database's log), overwriting or
        appending, read back through a second path now and then."""
        i = self.pick()
        append = self.rng.random() < 0.5
        rounds = self.rng.randint(3, 6)
        self.log(f"rhythm f{i} x{rounds} ({'append' if append else 'overwrite'})")
        for _ in range(rounds):
            size = len(self.model[i])
            off = size if append else self.offset(i, past_eof=False)
            data = self.data(self.rng.randint(1, 8192))
            if off + len(data) > self.maxlen:
                break
            if os.pwrite(self.fds[i], data, off) != len(data):
                self.fail(f"rhythm f{i}: short write")
            self.m_write(i, off, data)
            os.fsync(self.fds[i])
            if self.rng.random() < 0.3:
                self.check_data(i, off, os.pread(self.fds[i], len(data), off), "rhythm read")

    def op_reopen(self) -> None:
        i = self.pick()
        self.log(f"close and reopen f{i}")
        os.close(self.fds[i])
        self.fds[i] = os.open(self.paths[i], os.O_RDWR)

    def op_fallocate(self) -> None:
        i = self.pick()
        kind = self.rng.choice(list(FALLOC_MODES))
        mode = FALLOC_MODES[kind]
        off = self.offset(i)
        n = self.length(off)
        size = len(self.model[i])
        self.log(f"fallocate({kind}) f{i} {off:#x} +{n:#x} (size {size:#x})")
        try:
            fallocate(self.fds[i], mode, off, n)
        except OSError as e:
            self.log(f"  -> {errname(e)}")
            self.answer(f"fallocate {kind}", errname(e))
            return
        self.answer(f"fallocate {kind}", "ok")
        end = off + n
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            stop = min(end, size) if mode & FALLOC_FL_KEEP_SIZE else end
            if stop > off:
                self.m_write(i, off, bytes(stop - off))
        if not mode & FALLOC_FL_KEEP_SIZE and end > len(self.model[i]):
            self.m_truncate(i, end)

    def op_posix_fallocate(self) -> None:
        """glibc emulates it where fallocate is refused: it must work either way."""
        i = self.pick()
        off = self.offset(i)
        n = self.length(off)
        self.log(f"posix_fallocate f{i} {off:#x} +{n:#x} (size {len(self.model[i]):#x})")
        try:
            os.posix_fallocate(self.fds[i], off, n)
        except OSError as e:
            self.log(f"  -> {errname(e)}")
            self.answer("posix_fallocate", errname(e))
            return
        self.answer("posix_fallocate", "ok")
        if off + n > len(self.model[i]):
            self.m_truncate(i, off + n)

    def op_copy_range(self) -> None:
        src, dst = self.pick(), self.pick()
        ssize = len(self.model[src])
        if not ssize:
            return
        soff = self.offset(src, past_eof=False)
        n = self.length(soff)
        doff = self.offset(dst)
        n = max(1, min(n, self.maxlen - doff))
        if src == dst and soff < doff + n and doff < soff + n:
            return  # overlapping ranges of one file are EINVAL by definition
        kind = "within a file" if src == dst else "between files"
        self.log(f"copy_file_range f{src} {soff:#x} +{n:#x} -> f{dst} {doff:#x}")
        try:
            got = os.copy_file_range(self.fds[src], self.fds[dst], n, soff, doff)
        except OSError as e:
            self.log(f"  -> {errname(e)}")
            self.answer(f"copy_file_range {kind}", errname(e))
            return
        self.answer(f"copy_file_range {kind}", "ok")
        want = min(n, ssize - soff)
        if got != want:
            self.fail(f"copy_file_range copied {got} bytes, expected {want}")
        self.m_write(dst, doff, bytes(self.model[src][soff : soff + got]))

    def op_clone_range(self) -> None:
        """FICLONERANGE (reflink) of page-aligned ranges: refused or done, consistently."""
        src, dst = self.pick(), self.pick()
        ssize = len(self.model[src])
        if ssize < PAGE:
            return
        soff = self.rng.randrange(ssize // PAGE) * PAGE
        n = self.rng.randint(1, max(1, (ssize - soff) // PAGE)) * PAGE
        doff = self.rng.randrange(self.maxlen // PAGE) * PAGE
        if src == dst and soff < doff + n and doff < soff + n:
            return
        self.log(f"FICLONERANGE f{src} {soff:#x} +{n:#x} -> f{dst} {doff:#x}")
        arg = struct.pack("qQQQ", self.fds[src], soff, n, doff)
        try:
            fcntl.ioctl(self.fds[dst], FICLONERANGE, arg)
        except OSError as e:
            self.log(f"  -> {errname(e)}")
            self.answer("FICLONERANGE", errname(e))
            return
        self.answer("FICLONERANGE", "ok")
        self.m_write(dst, doff, bytes(self.model[src][soff : soff + n]))

    def op_drop_cache(self) -> None:
        """Drop one file's cached pages, or (rarely) the whole machine's: the next reads
        come from the daemon. Dirty pages stay unless written back first (sometimes)."""
        if self.rng.random() < 0.1:
            self.log("drop_caches")
            try:
                for fd in self.fds:
                    os.fsync(fd)
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                return
            except OSError:
                pass  # not root: one file's pages instead
        i = self.pick()
        sync = self.rng.random() < 0.3
        self.log(f"{'fdatasync, ' if sync else ''}fadvise DONTNEED f{i}")
        if sync:
            os.fdatasync(self.fds[i])
        os.posix_fadvise(self.fds[i], 0, 0, os.POSIX_FADV_DONTNEED)

    def remount(self) -> None:
        self.log("unmount and mount again")
        self.close_all()
        self.mount.umount()
        self.mount.start()
        self.open_all()
        self.compare_all("after the remount")

    # -- the run -----------------------------------------------------------------------
    def run(self) -> None:
        ops: list[tuple[Callable[[], None], float]] = [
            (self.op_write, 20),
            (self.op_read, 12),
            (self.op_read2, 6),
            (self.op_dread, 4),
            (self.op_dwrite, 3),
            (self.op_mapread, 7),
            (self.op_mapwrite, 7),
            (self.op_truncate, 6),
            (self.op_truncate_down_up, 3),
            (self.op_map_truncate, 2),
            (self.op_fsync, 3),
            (self.op_reopen, 3),
            (self.op_fallocate, 4),
            (self.op_posix_fallocate, 3),
            (self.op_copy_range, 5),
            (self.op_clone_range, 1),
            (self.op_drop_cache, 3),
        ]
        if self.rhythm:
            ops.append((self.op_rhythm, 6))
        funcs = [f for f, _ in ops]
        weights = [w for _, w in ops]
        self.open_all()
        for step in range(self.steps):
            self.step = step
            fn = self.rng.choices(funcs, weights)[0]
            try:
                fn()
            except OSError as e:
                self.fail(f"{fn.__name__}: unexpected {errname(e)} ({e})")
            self.counts[fn.__name__.removeprefix("op_")] += 1
            for i in range(NFILES):
                self.check_size(i)
            if self.step == self.remount_at or step % REMOUNT_EVERY == REMOUNT_EVERY - 1:
                self.remount()
            elif step % COMPARE_EVERY == COMPARE_EVERY - 1:
                cold = self.rng.random() < 0.5
                if cold:  # from the daemon (its buffers and its store), not the page cache
                    for fd in self.fds:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                self.compare_all(f"after step {step}{' (cold)' if cold else ''}")
        self.step = self.steps
        self.compare_all("at the end")
        self.close_all()
        self.compare_cold("at the end, read cold through fresh descriptors")


def _settings(default_steps: int, block: int) -> tuple[int, int, bool]:
    """Seed, steps and writeback mode: from the environment, or a fresh random run."""
    seed_env = os.environ.get("VAULTSYNC_FSX_SEED")
    seed = int(seed_env) if seed_env else random.SystemRandom().randrange(1 << 32)
    steps = int(os.environ.get("VAULTSYNC_FSX_STEPS") or default_steps)
    wb_env = os.environ.get("VAULTSYNC_FSX_WRITEBACK")
    writeback = wb_env == "1" if wb_env else random.Random(seed + 1).random() < 0.5
    print(
        f"VAULTSYNC_FSX_SEED={seed} VAULTSYNC_FSX_STEPS={steps} "
        f"(block size {block}, writeback_cache={writeback})"
    )
    return seed, steps, writeback


@pytest.mark.parametrize("block", CHUNK_SIZES, ids=lambda b: f"bs{b}")
def test_fsx(tmp_path: Path, block: int) -> None:
    seed, steps, writeback = _settings(DEFAULT_STEPS, block)
    mount = Mount.create(
        tmp_path / "vol",
        f"chunk_size = {block}\n[mount]\nwriteback_cache = {str(writeback).lower()}\n",
    )
    maxlen = int(os.environ.get("VAULTSYNC_FSX_MAXLEN") or 0)  # 0: a few blocks
    fsx = Fsx(mount, seed, steps, block, writeback, maxlen)
    _run(fsx, mount, steps)
    if steps >= 500:  # the run must have reached every kind of operation
        for kind in ("write", "read", "read2", "mapread", "mapwrite", "truncate", "copy_range"):
            assert fsx.counts[kind] >= 3, (kind, dict(fsx.counts))


def test_fsx_with_a_sync_target(tmp_path: Path, seaweedfs: LocalProvider) -> None:
    """The same, shorter, with one sync target: every fsync waits for an upload, and
    write+fsync runs take the path that commits and ships a write before answering it."""
    seed, steps, writeback = _settings(SYNC_STEPS, 64 * KIB)
    bucket = f"fsx-{random.SystemRandom().randrange(1 << 48):012x}"
    seaweedfs.create_bucket(bucket)
    mount = Mount.create(
        tmp_path / "vol",
        f"chunk_size = {64 * KIB}\n[mount]\nwriteback_cache = {str(writeback).lower()}\n"
        + target_block("sw", seaweedfs, bucket, "sync"),
    )
    fsx = Fsx(mount, seed, steps, 64 * KIB, writeback, rhythm=True)
    _run(fsx, mount, steps)
    if steps >= 500:
        assert fsx.counts["rhythm"] >= 10, dict(fsx.counts)


def _run(fsx: Fsx, mount: Mount, steps: int) -> None:
    t0 = time.monotonic()
    try:
        mount.start()
        fsx.run()
    finally:
        fsx.close_quietly()
        mount.cleanup()
    print(f"{steps} steps in {time.monotonic() - t0:.1f}s: {dict(fsx.counts)}")
    print(f"answers: {fsx.answers}")
    log = mount.log.read_text(errors="replace") if mount.log.exists() else ""
    assert "Traceback" not in log, log[-3000:]
