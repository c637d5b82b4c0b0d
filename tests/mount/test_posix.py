"""POSIX semantics of the real FUSE mount, compared with what Linux (ext4) does.

Most tests run against one module-wide mount (a volume with 1 MiB blocks), each
in a directory of its own, and where an errno is asserted the same operation is
run on a plain directory of the test machine's own filesystem (`tmp_path`,
ext4) to prove the expectation is Linux's, not ours. After every test the
daemon's log must hold no new traceback: an operation that failed inside the
daemon surfaces as EIO, and would otherwise hide behind a lenient test.

The kernel caches attributes and, with the writeback cache, trusts its own
size and times; what the daemon itself stored is checked by reading with a
cold page cache and, in the remount tests, by unmounting and mounting again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import stat
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.support.mounting import Mount
from vaultsync.engine.filereads import ChunkCache
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.volume import Volume
from vaultsync.format.header import new_header
from vaultsync.format.txn import ROOT_INO

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
BS = MiB  # block size of the module-wide volume
SMALL_BS = 64 * KiB  # the default block size (the `mounted` fixture)
USER = 1000  # an unprivileged uid/gid that exists on the test machine


# -- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["direct", "writeback"])
def volume(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Mount]:
    """Both ways the kernel can send writes (mount.writeback_cache), for every test."""
    wb = "true" if request.param else "false"
    m = Mount.create(
        tmp_path_factory.mktemp("posix"), f"chunk_size = {BS}\n[mount]\nwriteback_cache = {wb}\n"
    )
    m.start()
    try:
        yield m
    finally:
        m.cleanup()


def _tracebacks(log: Path, start: int) -> str:
    if not log.exists():
        return ""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return text if ("Traceback" in text or " failed" in text) else ""


@pytest.fixture
def mnt(volume: Mount, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory on the mount; the daemon must log no error while the test runs."""
    d = volume.mountpoint / request.node.name.replace("/", "_")[:200]
    d.mkdir()
    start = volume.log.stat().st_size if volume.log.exists() else 0
    yield d
    assert volume.proc is not None and volume.proc.poll() is None, "the daemon died"
    assert not _tracebacks(volume.log, start), _tracebacks(volume.log, start)[-3000:]


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    """The same test on the machine's own filesystem, for what Linux does."""
    d = tmp_path / "ref"
    d.mkdir()
    return d


@pytest.fixture
def both(mnt: Path, ref: Path) -> list[Path]:
    return [mnt, ref]


# -- helpers ---------------------------------------------------------------------------
def err(fn: Callable[[], object]) -> int:
    """The errno `fn` fails with, 0 if it succeeds."""
    try:
        fn()
    except OSError as e:
        return e.errno or -1
    return 0


def errs(dirs: list[Path], fn: Callable[[Path], object]) -> list[int]:
    return [err(lambda d=d: fn(d)) for d in dirs]  # type: ignore[misc]


def cold_read(p: Path, off: int = 0, n: int | None = None) -> bytes:
    """Read from the daemon, not the page cache: write back, drop the cached pages, read."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if n is None:
            n = os.fstat(fd).st_size - off
        out = bytearray()
        while len(out) < n:
            chunk = os.pread(fd, min(n - len(out), 8 * MiB), off + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def pwrite_all(p: Path, off: int, data: bytes, flags: int = 0) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def truncate(p: Path, size: int) -> None:
    os.truncate(p, size)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
_libc.renameat2.argtypes.append(ctypes.c_uint)
_libc.renameat2.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


def as_user(d: Path, fn: Callable[[], object], uid: int = USER) -> int:
    """Run `fn` in a forked child with `d` as its cwd and uid/gid `uid`; its errno (0 = ok)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.chdir(d)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()
        except OSError as e:
            code = e.errno or 250
        except BaseException:
            code = 251
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def inode_count(d: Path) -> int:
    s = os.statvfs(d)
    return s.f_files - s.f_ffree


# -- regular files ------------------------------------------------------------------------
def test_write_and_read_at_any_offset(both: list[Path]) -> None:
    rnd = os.urandom(3 * BS)
    writes = [
        (0, b"hello"),
        (3, b"XY"),
        (BS - 2, b"straddle"),  # across a block boundary
        (SMALL_BS - 1, b"abc"),
        (2 * BS + 100, rnd[: BS + 5]),  # spans several blocks, beyond EOF: a hole before it
        (7, rnd[:300_000]),
        (BS + 1, b""),  # an empty write changes nothing
    ]
    contents = []
    for d in both:
        p = d / "f"
        p.touch()
        for off, data in writes:
            pwrite_all(p, off, data)
        contents.append(p.read_bytes())
        assert cold_read(p) == contents[-1]
        # reads at odd offsets and sizes, including past EOF
        size = p.stat().st_size
        with open(p, "rb") as f:
            for off, n in [(0, 1), (BS - 3, 10), (size - 1, 10), (size, 10), (size + BS, 10)]:
                f.seek(off)
                assert f.read(n) == contents[-1][off : off + n]
    assert contents[0] == contents[1]
    assert len(contents[0]) == 3 * BS + 105


def test_append_with_o_append(both: list[Path]) -> None:
    for d in both:
        p = d / "log"
        p.write_bytes(b"start\n")
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"one\n")
            os.lseek(fd, 0, os.SEEK_SET)  # O_APPEND ignores the position
            os.write(fd, b"two\n")
            fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
            os.write(fd2, b"x" * (BS + 3))  # from another descriptor, across a block
            os.close(fd2)
            os.write(fd, b"three\n")
        finally:
            os.close(fd)
        with open(p, "ab") as f:
            f.write(b"four\n")
        want = b"start\none\ntwo\n" + b"x" * (BS + 3) + b"three\nfour\n"
        assert p.read_bytes() == want
        assert cold_read(p) == want
        assert p.stat().st_size == len(want)


def test_sparse_file_holes_read_zeros(both: list[Path]) -> None:
    for d in both:
        p = d / "sparse"
        pwrite_all(p, 3 * BS + 10, b"end")
        pwrite_all(p, BS // 2, b"mid")
        assert p.stat().st_size == 3 * BS + 13
        data = cold_read(p)
        assert data[: BS // 2] == bytes(BS // 2)
        assert data[BS // 2 : BS // 2 + 3] == b"mid"
        assert data[BS // 2 + 3 : 3 * BS + 10] == bytes(3 * BS + 10 - BS // 2 - 3)
        assert data[-3:] == b"end"
        # a file extended by truncate alone is all hole
        q = d / "hole"
        q.touch()
        truncate(q, 2 * BS + 1)
        assert cold_read(q) == bytes(2 * BS + 1)


TRUNCATE_STEPS: list[tuple[str, int]] = [
    ("write", 3 * BS + 500),  # fill with a pattern up to this size
    ("trunc", 3 * BS + 100),  # down, within the last block
    ("trunc", 2 * BS),  # down to a block boundary
    ("trunc", 2 * BS + 7),  # up, within a block: the tail must read zeros
    ("trunc", BS + 100),  # down across the boundary
    ("trunc", 5 * BS),  # up across several blocks
    ("write", 5 * BS + 10),  # rewrite everything
    ("trunc", SMALL_BS + 1),
    ("trunc", SMALL_BS - 1),
    ("trunc", 3),
    ("trunc", 4 * BS + 3),
    ("trunc", 0),
    ("trunc", BS - 1),
]


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
def test_truncate_up_and_down(both: list[Path], cold: bool) -> None:
    """Each step on both filesystems; after each, the whole content must be the same."""
    for step, (what, n) in enumerate(TRUNCATE_STEPS):
        seed = step + 1
        results = []
        for d in both:
            p = d / "t"
            if what == "write":
                pattern = hashlib.sha256(bytes([seed])).digest() * (n // 32 + 1)
                pwrite_all(p, 0, pattern[:n])
            else:
                with open(p, "r+b") as f:  # through a descriptor, as ftruncate
                    f.truncate(n)
            assert p.stat().st_size == n, (step, d)
            results.append(cold_read(p) if cold else p.read_bytes())
        assert results[0] == results[1], f"step {step}: {what} {n}"


def test_truncate_with_unflushed_writes_and_open_descriptor(both: list[Path]) -> None:
    outs = []
    for d in both:
        p = d / "t"
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"a" * (2 * BS + 10), 0)
            os.ftruncate(fd, BS + 5)
            os.pwrite(fd, b"b" * 10, BS + 20)  # past EOF: a hole of 15 bytes
            os.ftruncate(fd, BS + 25)
            os.ftruncate(fd, BS + 27)
            os.fsync(fd)
            assert os.fstat(fd).st_size == BS + 27
        finally:
            os.close(fd)
        outs.append(cold_read(p))
    want = b"a" * (BS + 5) + bytes(15) + b"b" * 5 + bytes(2)
    assert outs == [want, want]


def test_file_bigger_than_4gib(mnt: Path) -> None:
    p = mnt / "big"
    tail = os.urandom(100_000)
    pwrite_all(p, 5 * GiB, tail)
    pwrite_all(p, 4 * GiB - 3, b"around-4GiB")  # straddles 2**32
    assert p.stat().st_size == 5 * GiB + len(tail)
    assert cold_read(p, 5 * GiB, len(tail)) == tail
    assert cold_read(p, 4 * GiB - 3, 11) == b"around-4GiB"
    assert cold_read(p, 3 * GiB, 4096) == bytes(4096)  # the hole
    assert cold_read(p, 5 * GiB + len(tail) - 10, 100) == tail[-10:]  # short read at EOF
    with open(p, "r+b") as f:
        f.truncate(4 * GiB + 1)
    assert p.stat().st_size == 4 * GiB + 1
    assert cold_read(p, 4 * GiB - 3, 100) == b"arou"
    p.unlink()


def test_file_size_limit_is_ext4s(mnt: Path, volume: Mount) -> None:
    """EFBIG past 16 TiB - 4 KiB, as ext4 with 4 KiB blocks; a write across the limit is
    cut short at it. (Writeback mode: the kernel caches the write, the flush refuses it.)"""
    limit = (1 << 44) - 4096
    p = mnt / "huge"
    p.write_bytes(b"abc")
    assert err(partial(os.truncate, p, 999_999_999_999_999_999)) == errno.EFBIG
    assert err(partial(os.truncate, p, limit + 1)) == errno.EFBIG
    assert p.stat().st_size == 3
    os.truncate(p, limit)
    assert p.stat().st_size == limit
    os.truncate(p, 3)
    if "writeback_cache = true" not in volume.config.read_text():
        fd = os.open(p, os.O_WRONLY)
        try:
            assert err(partial(os.pwrite, fd, b"x", limit)) == errno.EFBIG
            assert os.pwrite(fd, b"0123456789", limit - 4) == 4
        finally:
            os.close(fd)
        assert p.stat().st_size == limit
        assert cold_read(p, limit - 4, 100) == b"0123"
    p.unlink()


def test_o_excl_and_o_trunc(both: list[Path]) -> None:
    for d in both:
        p = d / "f"
        p.write_bytes(b"x" * (BS + 10))
        excl = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        assert err(partial(os.open, p, excl)) == errno.EEXIST
        # O_EXCL on a dangling symlink also fails: it never follows
        os.symlink("nowhere", d / "dangling")
        assert err(partial(os.open, d / "dangling", excl)) == errno.EEXIST
        fd = os.open(d / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        assert stat.S_IMODE((d / "new").stat().st_mode) == 0o600
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
        try:
            assert os.fstat(fd).st_size == 0
            os.write(fd, b"new")
        finally:
            os.close(fd)
        assert p.read_bytes() == b"new"
        assert cold_read(p) == b"new"
        fd = os.open(p, os.O_RDONLY | os.O_TRUNC)  # unspecified by POSIX; Linux truncates
        os.close(fd)
        assert p.stat().st_size == 0 and cold_read(p) == b""


def test_files_with_identical_content_stay_independent(mnt: Path) -> None:
    """Blocks are deduplicated by content: changing one copy must not touch the other."""
    data = hashlib.sha256(b"dup").digest() * (2 * BS // 32 + 100)
    for name in ("a", "b", "c"):
        (mnt / name).write_bytes(data)
    with open(mnt / "a", "r+b") as f:
        f.truncate(BS + BS // 2)
        f.seek(10)
        f.write(b"changed")
    (mnt / "c").unlink()
    assert cold_read(mnt / "b") == data
    assert cold_read(mnt / "a") == data[:10] + b"changed" + data[17 : BS + BS // 2]


def test_two_descriptors_see_each_others_writes(mnt: Path) -> None:
    p = mnt / "shared"
    a = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    b = os.open(p, os.O_RDWR)
    try:
        os.pwrite(a, b"from-a", 0)
        assert os.pread(b, 100, 0) == b"from-a"
        os.pwrite(b, b"B", 2)
        assert os.pread(a, 100, 0) == b"frBm-a"
        os.pwrite(a, b"z" * 10, BS - 5)
        assert os.fstat(b).st_size == BS + 5
        assert os.pread(b, 10, BS - 5) == b"z" * 10
        os.ftruncate(b, 3)
        assert os.pread(a, 100, 0) == b"frB"
        os.fsync(a)
        os.fdatasync(b)
    finally:
        os.close(a)
        os.close(b)
    assert cold_read(p) == b"frB"


def test_large_write_reads_back_with_same_hash(mnt: Path) -> None:
    data = os.urandom(50 * MiB)
    want = hashlib.sha256(data).hexdigest()
    p = mnt / "large"
    with open(p, "wb") as f:
        for i in range(0, len(data), 3 * MiB + 17):  # writes unaligned to blocks
            f.write(data[i : i + 3 * MiB + 17])
    del data
    assert p.stat().st_size == 50 * MiB
    assert hashlib.sha256(cold_read(p)).hexdigest() == want


def test_fsync_and_fdatasync_return_ok(mnt: Path) -> None:
    p = mnt / "f"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"data")
        os.fsync(fd)
        os.write(fd, b"more")
        os.fdatasync(fd)
        os.fsync(fd)  # nothing dirty: still fine
    finally:
        os.close(fd)
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    os.sync()
    assert cold_read(p) == b"datamore"


def test_open_unlinked_file_lives_until_last_close(both: list[Path]) -> None:
    for d in both:
        p = d / "tmp"
        p.write_bytes(b"before" + b"." * BS)
        fd = os.open(p, os.O_RDWR)
        fd2 = os.open(p, os.O_RDONLY)
        try:
            p.unlink()
            assert not p.exists() and "tmp" not in os.listdir(d)
            assert os.fstat(fd).st_nlink == 0
            assert os.pread(fd, 6, 0) == b"before"
            os.pwrite(fd, b"after", BS + 6)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd2, 20, BS) == b"......after"
            assert os.pread(fd, 6, 0) == b"before"
            assert os.fstat(fd2).st_size == BS + 11
            os.close(fd2)
            fd2 = -1
            assert os.pread(fd, 5, BS + 6) == b"after"  # one descriptor still holds it
            # a new file may take the name meanwhile; it is a different file
            p.write_bytes(b"other")
            assert os.pread(fd, 6, 0) == b"before"
        finally:
            os.close(fd)
            if fd2 >= 0:
                os.close(fd2)
        assert p.read_bytes() == b"other"


def test_rename_over_an_open_file(both: list[Path]) -> None:
    base = inode_count(both[0])
    for d in both:
        (d / "old").write_bytes(b"old content")
        (d / "new").write_bytes(b"new content")
        fd = os.open(d / "old", os.O_RDWR)
        try:
            os.rename(d / "new", d / "old")
            assert os.fstat(fd).st_nlink == 0
            assert os.pread(fd, 100, 0) == b"old content"
            os.pwrite(fd, b"OLD", 0)
            os.fsync(fd)
            assert os.pread(fd, 3, 0) == b"OLD"
        finally:
            os.close(fd)
        assert cold_read(d / "old") == b"new content"
        assert os.listdir(d) == ["old"]
    assert wait_for(lambda: inode_count(both[0]) == base + 1), (
        "the replaced file outlived its close"
    )


def test_hard_link_of_an_open_file_survives_unlink_of_the_first_name(mnt: Path) -> None:
    base = inode_count(mnt)
    fd = os.open(mnt / "a", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc" * 100_000)
        os.link(mnt / "a", mnt / "b")
        os.unlink(mnt / "a")
        assert os.fstat(fd).st_nlink == 1
        os.write(fd, b"tail")
    finally:
        os.close(fd)
    assert cold_read(mnt / "b") == b"abc" * 100_000 + b"tail"
    assert inode_count(mnt) == base + 1
    (mnt / "b").unlink()
    assert wait_for(lambda: inode_count(mnt) == base)


def test_concurrent_writers_to_one_file(mnt: Path) -> None:
    """Threads write interleaved pieces of one file through their own descriptors while
    the daemon's timer flushes: every piece must land."""
    p = mnt / "shared"
    p.write_bytes(os.urandom(4 * BS))  # existing content: partial writes read-modify-write
    piece = 12_345  # unaligned to pages and blocks
    n_threads, rounds = 4, 120
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            fd = os.open(p, os.O_WRONLY)
            try:
                for r in range(rounds):
                    slot = r * n_threads + k
                    os.pwrite(fd, bytes([k + 1]) * piece, slot * piece)
                    if r % 40 == 39:
                        os.fsync(fd)
                        time.sleep(0.05)  # let the timer flush run between writes
            finally:
                os.close(fd)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = cold_read(p)
    assert len(data) == max(4 * BS, n_threads * rounds * piece)
    for slot in range(n_threads * rounds):
        k = slot % n_threads
        assert data[slot * piece : (slot + 1) * piece] == bytes([k + 1]) * piece, slot


def test_mmap_writes_reach_the_daemon(both: list[Path]) -> None:
    for d in both:
        p = d / "mapped"
        p.write_bytes(bytes(2 * BS))
        with open(p, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            m[BS - 3 : BS + 3] = b"mapped"
            m[:5] = b"start"
            m.flush()
        data = cold_read(p)
        assert data[:5] == b"start" and data[BS - 3 : BS + 3] == b"mapped"
        assert len(data) == 2 * BS


def test_unlinked_file_is_gone_after_close(mnt: Path) -> None:
    base = inode_count(mnt)
    p = mnt / "tmp"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * (2 * BS))
    assert inode_count(mnt) == base + 1
    p.unlink()
    assert inode_count(mnt) == base + 1  # still open: still there
    os.close(fd)
    assert wait_for(lambda: inode_count(mnt) == base), "the unlinked inode outlived its close"


# -- directories ------------------------------------------------------------------------
def test_directory_errors(both: list[Path]) -> None:
    for d in both:
        (d / "dir").mkdir()
        (d / "full").mkdir()
        (d / "full" / "child").write_bytes(b"")
        (d / "file").write_bytes(b"x")
    assert errs(both, lambda d: (d / "dir").mkdir()) == [errno.EEXIST] * 2
    assert errs(both, lambda d: (d / "file").mkdir()) == [errno.EEXIST] * 2
    assert errs(both, lambda d: (d / "full").rmdir()) == [errno.ENOTEMPTY] * 2
    assert errs(both, lambda d: (d / "file").rmdir()) == [errno.ENOTDIR] * 2
    assert errs(both, lambda d: (d / "dir").unlink()) == [errno.EISDIR] * 2
    assert errs(both, lambda d: (d / "missing").rmdir()) == [errno.ENOENT] * 2
    assert errs(both, lambda d: (d / "missing").unlink()) == [errno.ENOENT] * 2
    assert errs(both, lambda d: (d / "file" / "x").mkdir()) == [errno.ENOTDIR] * 2
    assert errs(both, lambda d: os.listdir(d / "file")) == [errno.ENOTDIR] * 2
    assert errs(both, lambda d: (d / ("n" * 256)).mkdir()) == [errno.ENAMETOOLONG] * 2
    assert errs(both, lambda d: (d / ("n" * 255)).mkdir()) == [0, 0]
    assert errs(both, lambda d: os.rmdir(f"{d}/dir/.")) == [errno.EINVAL] * 2
    assert errs(both, lambda d: os.rmdir(f"{d}/dir/..")) == [errno.ENOTEMPTY] * 2
    assert errs(both, lambda d: os.open(d / "dir", os.O_WRONLY)) == [errno.EISDIR] * 2
    assert errs(both, lambda d: os.open(d / "file", os.O_DIRECTORY)) == [errno.ENOTDIR] * 2
    # a directory removed while open lists as empty and takes no new entries
    for d in both:
        (d / "doomed").mkdir()
        fd = os.open(d / "doomed", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.rmdir(d / "doomed")
            assert err(partial(list, getdents(fd))) in (0, errno.ENOENT)
            assert err(partial(os.mkdir, "x", dir_fd=fd)) == errno.ENOENT
            assert err(partial(os.open, "y", os.O_CREAT, dir_fd=fd)) == errno.ENOENT
            assert os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)
    for d in both:
        (d / "full" / "child").unlink()
        (d / "full").rmdir()
        assert sorted(os.listdir(d)) == sorted(["dir", "file", "n" * 255])


def test_directory_removed_while_open_goes_at_close(mnt: Path) -> None:
    base = inode_count(mnt)
    (mnt / "d").mkdir()
    fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(mnt / "d")
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 0
        assert mnt.stat().st_nlink == 2
        assert not (mnt / "d").exists()
        (mnt / "d").mkdir()  # the name is free for a new directory
        assert os.stat(mnt / "d").st_ino != st.st_ino
        (mnt / "d").rmdir()
    finally:
        os.close(fd)
    assert wait_for(lambda: inode_count(mnt) == base), "the removed directory outlived its close"


def test_directory_nlink_counts_subdirectories(both: list[Path]) -> None:
    for d in both:
        top = d / "top"
        top.mkdir()
        assert top.stat().st_nlink == 2
        for i in range(3):
            (top / f"sub{i}").mkdir()
        (top / "file").touch()
        assert top.stat().st_nlink == 5
        (top / "sub0").rmdir()
        assert top.stat().st_nlink == 4
        assert os.stat(top / "sub1" / "..").st_ino == top.stat().st_ino


_SYS_GETDENTS64 = {"x86_64": 217, "aarch64": 61}.get(os.uname().machine)


def getdents(fd: int, bufsize: int = 512) -> Iterator[list[str]]:
    """The raw getdents64 calls, a few entries each, so the caller can act between them."""
    assert _SYS_GETDENTS64 is not None, "unknown architecture"
    buf = ctypes.create_string_buffer(bufsize)
    while True:
        n = _libc.syscall(_SYS_GETDENTS64, fd, buf, bufsize)
        if n < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        if n == 0:
            return
        raw, pos, names = buf.raw[:n], 0, []
        while pos < n:
            (reclen,) = struct.unpack_from("<H", raw, pos + 16)
            names.append(os.fsdecode(raw[pos + 19 : pos + reclen].split(b"\0", 1)[0]))
            pos += reclen
        yield names


def test_listing_is_stable_while_entries_change(both: list[Path]) -> None:
    """Entries there all along are listed exactly once, whatever changes between reads."""
    keep = [f"keep-{i:04d}" for i in range(400)]
    gone = [f"gone-{i:04d}" for i in range(200)]
    for d in both:
        for i, n in enumerate(keep):  # victims among the keepers: removals before and after
            os.close(os.open(d / n, os.O_CREAT | os.O_WRONLY, 0o644))
            if i % 2:
                os.close(os.open(d / gone[i // 2], os.O_CREAT | os.O_WRONLY, 0o644))
        seen: dict[str, int] = {}
        created: list[str] = []
        victims = list(gone)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for calls, names in enumerate(getdents(fd)):
                for name in names:
                    seen[name] = seen.get(name, 0) + 1
                if len(created) >= 120:
                    continue  # (new entries come last here: a reader adding forever never ends)
                for _ in range(5):
                    if victims:
                        os.unlink(d / victims.pop(calls % len(victims)))
                    name = f"new-{len(created):04d}"
                    os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))
                    created.append(name)
                # replaced, not removed: the name is there all along
                (d / "tmp").write_bytes(b"")
                os.rename(d / "tmp", d / keep[(calls * 37) % len(keep)])
        finally:
            os.close(fd)
        assert len(created) == 120, "the listing was not interleaved with changes"
        assert seen.pop(".") == 1 and seen.pop("..") == 1
        missing = [n for n in keep if seen.get(n) != 1]
        assert not missing, f"{d}: {len(missing)} stable entries not seen exactly once"
        twice = [n for n, c in seen.items() if c > 1]
        assert not twice, f"{d}: seen twice: {twice[:5]}"
        assert not set(seen) - set(keep) - set(gone) - set(created)
        assert set(os.listdir(d)) == set(keep) | set(victims) | set(created)


def test_readdir_reports_types_and_inodes(mnt: Path) -> None:
    (mnt / "d").mkdir()
    (mnt / "f").touch()
    os.symlink("f", mnt / "l")
    os.mkfifo(mnt / "p")
    with os.scandir(mnt) as it:
        ents = {e.name: e for e in it}
    assert set(ents) == {"d", "f", "l", "p"}
    assert ents["d"].is_dir() and ents["f"].is_file() and ents["l"].is_symlink()
    for name, e in ents.items():
        assert e.inode() == os.lstat(mnt / name).st_ino


# -- rename ----------------------------------------------------------------------------
def test_rename_replacing_and_refusing(both: list[Path]) -> None:
    for d in both:
        (d / "a").write_bytes(b"A")
        (d / "b").write_bytes(b"B")
        (d / "empty").mkdir()
        (d / "dir").mkdir()
        (d / "full").mkdir()
        (d / "full" / "x").touch()
    # over an existing file: the target is replaced
    assert errs(both, lambda d: os.rename(d / "a", d / "b")) == [0, 0]
    for d in both:
        assert (d / "b").read_bytes() == b"A" and not (d / "a").exists()
    # a directory over an empty directory
    assert errs(both, lambda d: os.rename(d / "dir", d / "empty")) == [0, 0]
    for d in both:
        assert (d / "empty").is_dir() and not (d / "dir").exists()
    assert errs(both, lambda d: os.rename(d / "empty", d / "full")) == [errno.ENOTEMPTY] * 2
    assert errs(both, lambda d: os.rename(d / "b", d / "full")) == [errno.EISDIR] * 2
    assert errs(both, lambda d: os.rename(d / "full", d / "b")) == [errno.ENOTDIR] * 2
    assert errs(both, lambda d: os.rename(d / "full", d / "full" / "sub")) == [errno.EINVAL] * 2
    assert errs(both, lambda d: os.rename(d / "missing", d / "z")) == [errno.ENOENT] * 2
    assert errs(both, lambda d: os.rename(d / "b", d / "nodir" / "b")) == [errno.ENOENT] * 2
    assert errs(both, lambda d: os.rename(d / "b", d / "b")) == [0, 0]  # to itself: a no-op
    for d in both:
        os.link(d / "b", d / "b2")
    # two names of one file: rename does nothing, both names stay
    assert errs(both, lambda d: os.rename(d / "b", d / "b2")) == [0, 0]
    for d in both:
        assert (d / "b").exists() and (d / "b2").stat().st_nlink == 2
    listings = [sorted(os.listdir(d)) for d in both]
    assert listings[0] == listings[1] == ["b", "b2", "empty", "full"]


def test_rename_into_own_subdirectory_is_einval(both: list[Path]) -> None:
    for d in both:
        (d / "a" / "b" / "c").mkdir(parents=True)
    assert errs(both, lambda d: os.rename(d / "a", d / "a" / "b" / "c" / "a")) == [errno.EINVAL] * 2
    assert errs(both, lambda d: os.rename(d / "a", d / "a" / "b")) == [errno.EINVAL] * 2
    # the ancestor as the target: it is not empty (the entry is inside it)
    assert errs(both, lambda d: os.rename(d / "a" / "b", d / "a")) == [errno.ENOTEMPTY] * 2


def test_rename_across_directories_keeps_link_counts(both: list[Path]) -> None:
    for d in both:
        src, dst = d / "src", d / "dst"
        (src / "moving" / "inner").mkdir(parents=True)
        (src / "file").write_bytes(b"f")
        dst.mkdir()
        ino = (src / "moving").stat().st_ino
        assert (src.stat().st_nlink, dst.stat().st_nlink) == (3, 2)
        os.rename(src / "moving", dst / "moved")
        assert (src.stat().st_nlink, dst.stat().st_nlink) == (2, 3)
        assert (dst / "moved").stat().st_ino == ino
        assert (dst / "moved").stat().st_nlink == 3
        assert os.stat(dst / "moved" / "..").st_ino == dst.stat().st_ino
        os.rename(src / "file", dst / "moved" / "inner" / "file")
        assert (dst / "moved" / "inner" / "file").read_bytes() == b"f"
        assert (src.stat().st_nlink, dst.stat().st_nlink) == (2, 3)
        # replacing an empty directory in another parent: that parent loses one link
        (src / "victim").mkdir()
        (dst / "moved2").mkdir()
        assert (src.stat().st_nlink, dst.stat().st_nlink) == (3, 4)
        os.rename(dst / "moved2", src / "victim")
        assert (src.stat().st_nlink, dst.stat().st_nlink) == (3, 3)
        assert os.listdir(src) == ["victim"]


def test_renameat2_noreplace_and_exchange(both: list[Path]) -> None:
    for d in both:
        (d / "a").write_bytes(b"A")
        (d / "b").write_bytes(b"B")
        (d / "x").mkdir()
        (d / "x" / "sub").mkdir()
        (d / "y").mkdir()
    assert errs(both, lambda d: renameat2(d / "a", d / "b", RENAME_NOREPLACE)) == [errno.EEXIST] * 2
    assert errs(both, lambda d: renameat2(d / "a", d / "c", RENAME_NOREPLACE)) == [0, 0]
    assert (
        errs(both, lambda d: renameat2(d / "c", d / "nope", RENAME_EXCHANGE)) == [errno.ENOENT] * 2
    )
    assert errs(both, lambda d: renameat2(d / "c", d / "b", RENAME_EXCHANGE)) == [0, 0]
    for d in both:
        assert (d / "c").read_bytes() == b"B" and (d / "b").read_bytes() == b"A"
    # a directory and a file, in different parents: the parents' link counts follow
    for d in both:
        (d / "y" / "f").write_bytes(b"F")
        assert ((d / "x").stat().st_nlink, (d / "y").stat().st_nlink) == (3, 2)
    assert errs(both, lambda d: renameat2(d / "x" / "sub", d / "y" / "f", RENAME_EXCHANGE)) == [
        0,
        0,
    ]
    for d in both:
        assert (d / "x" / "sub").read_bytes() == b"F"
        assert (d / "y" / "f").is_dir()
        assert ((d / "x").stat().st_nlink, (d / "y").stat().st_nlink) == (2, 3)
        assert os.stat(d / "y" / "f" / "..").st_ino == (d / "y").stat().st_ino
    assert errs(both, lambda d: renameat2(d / "x", d / "y", RENAME_EXCHANGE)) == [0, 0]
    assert (
        errs(both, lambda d: renameat2(d / "x", d / "x" / "f", RENAME_EXCHANGE))
        == [errno.EINVAL] * 2
    )
    assert errs(both, lambda d: renameat2(d / "b", d / "c", 3)) == [errno.EINVAL] * 2
    listings = [sorted(str(p.relative_to(d)) for p in d.rglob("*")) for d in both]
    assert listings[0] == listings[1]


def test_rename_whiteout_leaves_a_whiteout(both: list[Path]) -> None:
    """renameat2(RENAME_WHITEOUT), which overlayfs uses on its upper layer: the old name
    becomes a 0:0 character device with no permission bits, owned by the caller."""
    for d in both:
        (d / "a").write_bytes(b"A")
        (d / "sg").mkdir()
        os.chown(d / "sg", 0, USER)
        os.chmod(d / "sg", 0o2755)
        (d / "sg" / "x").write_bytes(b"X")
    assert errs(both, lambda d: renameat2(d / "a", d / "b", RENAME_WHITEOUT)) == [0, 0]
    assert errs(both, lambda d: renameat2(d / "sg" / "x", d / "y", RENAME_WHITEOUT)) == [0, 0]
    for d in both:
        assert (d / "b").read_bytes() == b"A" and (d / "y").read_bytes() == b"X"
        for wh, gid in ((d / "a", 0), (d / "sg" / "x", USER)):  # a setgid parent's group
            st = os.lstat(wh)
            assert (st.st_mode, st.st_rdev, st.st_nlink) == (stat.S_IFCHR, 0, 1)
            assert (st.st_uid, st.st_gid) == (0, gid)
    flags = RENAME_WHITEOUT | RENAME_EXCHANGE
    assert errs(both, lambda d: renameat2(d / "b", d / "y", flags)) == [errno.EINVAL] * 2


# -- links and special files -------------------------------------------------------------
def test_hard_links(both: list[Path]) -> None:
    for d in both:
        (d / "f").write_bytes(b"data")
        (d / "sub").mkdir()
        os.link(d / "f", d / "g")
        os.link(d / "f", d / "sub" / "h")
        st = (d / "f").stat()
        assert st.st_nlink == 3
        assert (d / "sub" / "h").stat().st_ino == st.st_ino
        with open(d / "g", "ab") as f:
            f.write(b"+")
        assert (d / "sub" / "h").read_bytes() == b"data+"
        (d / "f").unlink()
        assert (d / "g").stat().st_nlink == 2
        assert (d / "sub").stat().st_nlink == 2  # a file link is not a subdirectory
    assert errs(both, lambda d: os.link(d / "sub", d / "sub2")) == [errno.EPERM] * 2
    assert errs(both, lambda d: os.link(d / "g", d / "sub" / "h")) == [errno.EEXIST] * 2
    assert errs(both, lambda d: os.link(d / "missing", d / "m")) == [errno.ENOENT] * 2
    for d in both:
        (d / "g").unlink()
        assert (d / "sub" / "h").stat().st_nlink == 1
        assert cold_read(d / "sub" / "h") == b"data+"


def test_symlinks(both: list[Path]) -> None:
    for d in both:
        target = "../" + "t" * 200 + "/x"
        os.symlink(target, d / "dangling")
        assert os.readlink(d / "dangling") == target
        st = os.lstat(d / "dangling")
        assert stat.S_ISLNK(st.st_mode) and st.st_size == len(target)
        assert stat.S_IMODE(st.st_mode) == 0o777
        (d / "file").write_bytes(b"content")
        os.symlink("file", d / "ok")
        assert (d / "ok").read_bytes() == b"content"
        assert os.stat(d / "ok").st_ino == os.stat(d / "file").st_ino
        os.symlink(".", d / "self")
        assert os.path.samefile(d / "self" / "self" / "file", d / "file")
        os.link(d / "ok", d / "ok2", follow_symlinks=False)  # a hard link to the link itself
        assert os.lstat(d / "ok2").st_nlink == 2 and os.readlink(d / "ok2") == "file"
    assert errs(both, lambda d: (d / "dangling").stat()) == [errno.ENOENT] * 2
    assert errs(both, lambda d: os.readlink(d / "file")) == [errno.EINVAL] * 2
    assert errs(both, lambda d: os.symlink("x", d / "file")) == [errno.EEXIST] * 2
    assert errs(both, lambda d: os.symlink("x" * 4096, d / "long")) == [errno.ENAMETOOLONG] * 2
    assert errs(both, lambda d: os.symlink("y" * 4095, d / "long")) == [0, 0]
    for d in both:
        assert os.readlink(d / "long") == "y" * 4095


def test_mkfifo_and_mknod(both: list[Path]) -> None:
    dev = os.makedev(1, 3)
    for d in both:
        os.mkfifo(d / "fifo", 0o640)
        st = os.lstat(d / "fifo")
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        r = os.open(d / "fifo", os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(d / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.write(w, b"through the pipe")
        assert os.read(r, 100) == b"through the pipe"
        os.close(w)
        os.close(r)
        os.mknod(d / "null", stat.S_IFCHR | 0o600, dev)
        st = os.lstat(d / "null")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == dev
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
        os.mknod(d / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 300))
        st = os.lstat(d / "blk")
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 300)
        os.mknod(d / "reg", stat.S_IFREG | 0o600)
        assert stat.S_ISREG(os.lstat(d / "reg").st_mode)
        os.mknod(d / "sock", stat.S_IFSOCK | 0o600)
        assert stat.S_ISSOCK(os.lstat(d / "sock").st_mode)
    assert errs(both, lambda d: os.mkfifo(d / "fifo")) == [errno.EEXIST] * 2


# -- attributes ---------------------------------------------------------------------------
def test_chmod_chown_and_nanosecond_times(both: list[Path]) -> None:
    atime, mtime = 1_234_567_890_123_456_789, 987_654_321_987_654_321
    for d in both:
        p = d / "f"
        p.write_bytes(b"x")
        os.chmod(p, 0o4751)
        assert stat.S_IMODE(p.stat().st_mode) == 0o4751
        os.chown(p, USER, USER + 1)
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (USER, USER + 1)
        assert stat.S_IMODE(st.st_mode) == 0o751  # chown drops the setuid bit
        os.chown(p, -1, 0)
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (USER, 0)
        os.utime(p, ns=(atime, mtime))
        st = p.stat()
        assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
        os.utime(p, ns=(-1_500_000_000, 1))  # before the epoch, and the smallest step
        st = p.stat()
        assert (st.st_atime_ns, st.st_mtime_ns) == (-1_500_000_000, 1)
        before = time.time_ns()
        os.utime(p)  # now
        st = p.stat()
        assert st.st_mtime_ns >= before - 10_000_000 and st.st_atime_ns >= before - 10_000_000
        (d / "dir").mkdir()
        os.chmod(d / "dir", 0o1777)
        os.utime(d / "dir", ns=(atime, mtime))
        st = (d / "dir").stat()
        assert stat.S_IMODE(st.st_mode) == 0o1777 and st.st_mtime_ns == mtime
        os.symlink("f", d / "l")
        os.utime(d / "l", ns=(5, 6), follow_symlinks=False)
        assert os.lstat(d / "l").st_mtime_ns == 6 and p.stat().st_mtime_ns != 6
        os.chown(p, 0, 0)
        os.chown(d / "l", USER, USER, follow_symlinks=False)
        assert os.lstat(d / "l").st_uid == USER and p.stat().st_uid == 0


def test_times_outside_the_range_are_clamped_not_refused(both: list[Path]) -> None:
    """utimensat(2) takes any 64-bit second count and ext4 clamps to the range it keeps; so
    do we (our top is 2**63 - 1 ns, in 2262, short of ext4's 2446), where storing 2**40 s
    as nanoseconds used to overflow into EIO."""
    for d in both:
        (d / "f").touch()
    assert errs(both, lambda d: os.utime(d / "f", ns=(2**40 * 10**9, 2**33 * 10**9 + 5))) == [0, 0]
    sts = [os.stat(d / "f") for d in both]
    assert [s.st_mtime_ns for s in sts] == [2**33 * 10**9 + 5] * 2  # in range: kept exactly
    assert sts[0].st_atime_ns == 2**63 - 1
    assert sts[1].st_atime_ns == 0x37FFFFFFF * 10**9  # ext4's last second, in 2446
    assert errs(both, lambda d: os.utime(d / "f", ns=(-(2**40) * 10**9, -1))) == [0, 0]
    assert [os.stat(d / "f").st_atime_ns for d in both] == [-(2**31) * 10**9] * 2
    assert [os.stat(d / "f").st_mtime_ns for d in both] == [-1, -1]


def test_utime_after_unflushed_write_sticks(both: list[Path]) -> None:
    for d in both:
        p = d / "f"
        with open(p, "wb") as f:
            f.write(b"x" * 100_000)
            f.flush()
            os.utime(p, ns=(10**18, 2 * 10**18))
            f.write(b"y")  # a write after utime moves mtime on again, as on Linux
            f.flush()
            os.fsync(f.fileno())
            os.utime(f.fileno(), ns=(10**18, 3 * 10**18))
        assert p.stat().st_mtime_ns == 3 * 10**18


def _open_trunc(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))


def test_listing_a_directory_and_following_a_link_update_atime(both: list[Path]) -> None:
    """Reading a directory or a symlink is an access, and the daemon owns atime (the
    kernel does not stamp it on FUSE): relatime, as on ext4."""
    old = 10**18  # 2001: atime and mtime both in the past, atime not after mtime
    for d in both:
        (d / "sub").mkdir()
        os.symlink("sub", d / "link")
        os.utime(d / "sub", ns=(old, old))
        os.utime(d / "link", ns=(old, old), follow_symlinks=False)
        time.sleep(0.02)  # ext4's coarse clock: the new atime must come after that ctime
        os.listdir(d / "sub")
        os.listdir(d / "link")  # follows the link
        sub, link = os.stat(d / "sub").st_atime_ns, os.lstat(d / "link").st_atime_ns
        assert sub > old and link > old
        time.sleep(0.02)
        os.listdir(d / "link")  # atime now after mtime and ctime: relatime leaves it
        assert (os.stat(d / "sub").st_atime_ns, os.lstat(d / "link").st_atime_ns) == (sub, link)


def test_ctime_changes(both: list[Path]) -> None:
    def changes(p: Path, op: Callable[[], object], after: Path | None = None) -> bool:
        before = os.lstat(p).st_ctime_ns
        time.sleep(0.02)
        op()
        return os.lstat(after or p).st_ctime_ns > before

    for d in both:
        f = d / "f"
        f.write_bytes(b"x")
        assert changes(f, partial(os.chmod, f, 0o600))
        assert changes(f, partial(os.chown, f, USER, USER))
        assert changes(f, partial(os.chown, f, -1, -1))  # POSIX: ctime marked all the same
        assert changes(f, partial(os.link, f, d / "g"))
        assert changes(f, partial(os.unlink, d / "g"))
        assert changes(f, partial(os.utime, f, ns=(1, 2)))
        assert changes(f, partial(os.setxattr, f, "user.k", b"v"))
        assert changes(f, partial(os.removexattr, f, "user.k"))
        assert changes(f, partial(os.truncate, f, 0))
        mt = f.stat().st_mtime_ns
        assert changes(f, partial(_open_trunc, f))  # already empty
        assert f.stat().st_mtime_ns > mt
        (d / "sub").mkdir()
        # rename: the moved inode, and both parents
        assert changes(f, partial(os.rename, f, d / "sub" / "f"), d / "sub" / "f")
        assert changes(d / "sub", partial(os.rename, d / "sub" / "f", d / "f2"))
        assert changes(d, partial(os.rename, d / "f2", d / "sub" / "f3"))
        mt = (d / "sub").stat().st_mtime_ns
        time.sleep(0.02)
        (d / "sub" / "new").touch()
        assert (d / "sub").stat().st_mtime_ns > mt


# -- permissions ----------------------------------------------------------------------------
def test_permission_checks_as_another_user(both: list[Path]) -> None:
    for d in both:
        os.chmod(d, 0o755)
        (d / "rootfile").write_bytes(b"secret")
        os.chmod(d / "rootfile", 0o644)
        (d / "private").write_bytes(b"p")
        os.chmod(d / "private", 0o600)
        (d / "open").mkdir()
        os.chmod(d / "open", 0o777)
        (d / "sticky").mkdir()
        os.chmod(d / "sticky", 0o1777)
        (d / "sticky" / "roots").touch()

    def read_rootfile() -> None:
        with open("rootfile", "rb") as f:
            assert f.read() == b"secret"

    def create_in_open() -> None:
        os.close(os.open("open/mine", os.O_CREAT | os.O_WRONLY, 0o644))
        assert os.stat("open/mine").st_uid == USER
        os.mkdir("open/mydir")
        assert os.stat("open/mydir").st_gid == USER

    cases: list[tuple[Callable[[], object], int]] = [
        (lambda: os.open("rootfile", os.O_WRONLY), errno.EACCES),
        (lambda: os.open("rootfile", os.O_RDWR | os.O_TRUNC), errno.EACCES),
        (lambda: os.truncate("rootfile", 0), errno.EACCES),
        (lambda: os.open("private", os.O_RDONLY), errno.EACCES),
        (lambda: os.open("newfile", os.O_CREAT | os.O_WRONLY, 0o644), errno.EACCES),
        (lambda: os.mkdir("newdir"), errno.EACCES),
        (lambda: os.unlink("rootfile"), errno.EACCES),
        (lambda: os.rename("rootfile", "open/stolen"), errno.EACCES),
        (lambda: os.chmod("rootfile", 0o666), errno.EPERM),
        (lambda: os.chown("rootfile", USER, USER), errno.EPERM),
        (lambda: os.utime("rootfile", ns=(1, 1)), errno.EPERM),
        (lambda: os.setxattr("rootfile", "user.x", b"1"), errno.EACCES),
        (lambda: os.unlink("sticky/roots"), errno.EPERM),
        (read_rootfile, 0),
        (create_in_open, 0),
    ]
    for i, (fn, want) in enumerate(cases):
        got = [as_user(d, fn) for d in both]
        assert got == [want, want], f"case {i}: got {got}, want {want}"
    for d in both:
        assert (d / "rootfile").read_bytes() == b"secret"
        assert not (d / "newfile").exists()
        # a write by someone else drops setuid and setgid, as the kernel says
        (d / "open" / "suid").write_bytes(b"x")
        os.chmod(d / "open" / "suid", 0o6777)

    def write_suid() -> None:
        with open("open/suid", "r+b") as f:
            f.write(b"y")

    assert [as_user(d, write_suid) for d in both] == [0, 0]
    modes = [stat.S_IMODE((d / "open" / "suid").stat().st_mode) for d in both]
    assert modes == [0o777, 0o777]


def test_o_trunc_by_another_user_drops_setuid_as_truncate_does(both: list[Path]) -> None:
    """With atomic O_TRUNC the kernel leaves the truncation, and so dropping the setuid
    and setgid bits, to the daemon: open(O_TRUNC) by someone other than root must drop
    them as truncate() does; by root (CAP_FSETID) it must not."""
    modes = {"a": 0o6777, "b": 0o2767, "c": 0o4755, "root": 0o6777}
    for d in both:
        os.chmod(d, 0o755)
        for name, mode in modes.items():
            (d / name).write_bytes(b"data")
            os.chown(d / name, USER, USER)
            os.chmod(d / name, mode)

    def otrunc(name: str) -> Callable[[], None]:
        return lambda: os.close(os.open(name, os.O_WRONLY | os.O_TRUNC))

    for name in "abc":
        assert [as_user(d, otrunc(name)) for d in both] == [0, 0]
    for d in both:
        otrunc(str(d / "root"))()
    got = [{n: stat.S_IMODE((d / n).stat().st_mode) for n in modes} for d in both]
    # setgid without group-execute stays for a member of the file's group
    assert got[0] == got[1] == {"a": 0o777, "b": 0o2767, "c": 0o755, "root": 0o6777}
    assert [(d / "a").stat().st_size for d in both] == [0, 0]


# -- xattrs -----------------------------------------------------------------------------------
def test_xattrs(both: list[Path]) -> None:
    for d in both:
        p = d / "f"
        p.write_bytes(b"")
        (d / "dir").mkdir()
        assert os.listxattr(p) == []
        os.setxattr(p, "user.one", b"1")
        os.setxattr(p, "user.two", b"\x00binary\xff" * 100)
        os.setxattr(p, "user.empty", b"")
        os.setxattr(d / "dir", "user.on-dir", b"yes")
        assert os.getxattr(p, "user.one") == b"1"
        assert os.getxattr(p, "user.two") == b"\x00binary\xff" * 100
        assert os.getxattr(p, "user.empty") == b""
        assert sorted(os.listxattr(p)) == ["user.empty", "user.one", "user.two"]
        assert os.listxattr(d / "dir") == ["user.on-dir"]
        os.setxattr(p, "user.one", b"replaced", os.XATTR_REPLACE)
        assert os.getxattr(p, "user.one") == b"replaced"
        os.setxattr(p, "user.three", b"3", os.XATTR_CREATE)
        os.removexattr(p, "user.two")
        assert sorted(os.listxattr(p)) == ["user.empty", "user.one", "user.three"]
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.getxattr(fd, "user.three") == b"3"
        finally:
            os.close(fd)
    assert (
        errs(both, lambda d: os.setxattr(d / "f", "user.one", b"x", os.XATTR_CREATE))
        == [errno.EEXIST] * 2
    )
    assert (
        errs(both, lambda d: os.setxattr(d / "f", "user.new", b"x", os.XATTR_REPLACE))
        == [errno.ENODATA] * 2
    )
    assert errs(both, lambda d: os.getxattr(d / "f", "user.missing")) == [errno.ENODATA] * 2
    assert errs(both, lambda d: os.removexattr(d / "f", "user.missing")) == [errno.ENODATA] * 2
    assert errs(both, lambda d: os.getxattr(d / "f", "user.two")) == [errno.ENODATA] * 2
    assert errs(both, lambda d: os.setxattr(d / "f", "bogus.ns", b"x")) == [errno.EOPNOTSUPP] * 2
    assert errs(both, lambda d: os.getxattr(d / "f", "bogus.ns")) == [errno.EOPNOTSUPP] * 2
    assert errs(both, lambda d: os.setxattr(d / "f", "user.", b"x")) == [errno.EINVAL] * 2
    assert (
        errs(both, lambda d: os.setxattr(d / "f", "user." + "n" * 300, b"x")) == [errno.ERANGE] * 2
    )
    for d in both:
        assert os.getxattr(d / "f", "user.one") == b"replaced"  # failed calls changed nothing
        assert "user.new" not in os.listxattr(d / "f")


def test_trusted_xattrs_are_listed_for_root_only(both: list[Path]) -> None:
    """Only a privileged process sees trusted.* names in listxattr(2), as on ext4; anyone
    may list the rest. Reading one unprivileged is ENODATA, writing EPERM (the kernel's)."""
    for d in both:
        os.chmod(d, 0o755)
        (d / "f").write_bytes(b"")
        os.chmod(d / "f", 0o644)
        os.setxattr(d / "f", "user.u", b"1")
        os.setxattr(d / "f", "trusted.t", b"2")
        os.setxattr(d / "f", "security.s", b"3")
        assert sorted(os.listxattr(d / "f")) == ["security.s", "trusted.t", "user.u"]

    def listed() -> None:
        assert sorted(os.listxattr("f")) == ["security.s", "user.u"]

    assert [as_user(d, listed) for d in both] == [0, 0]
    assert [as_user(d, lambda: os.getxattr("f", "trusted.t")) for d in both] == [errno.ENODATA] * 2


def test_xattrs_go_with_the_inode(mnt: Path) -> None:
    base = inode_count(mnt)
    p = mnt / "f"
    p.write_bytes(b"x")
    os.setxattr(p, "user.a", b"1")
    os.link(p, mnt / "g")
    assert os.getxattr(mnt / "g", "user.a") == b"1"
    os.rename(p, mnt / "h")
    assert os.getxattr(mnt / "h", "user.a") == b"1"
    (mnt / "h").unlink()
    (mnt / "g").unlink()
    assert wait_for(lambda: inode_count(mnt) == base)
    (mnt / "g").write_bytes(b"")
    assert os.listxattr(mnt / "g") == []


def test_statvfs_is_sane(mnt: Path) -> None:
    s = os.statvfs(mnt)
    assert s.f_bsize > 0 and s.f_frsize > 0
    assert s.f_blocks > 0 and s.f_blocks >= s.f_bfree >= s.f_bavail >= 0
    assert s.f_files > 0 and s.f_files >= s.f_ffree >= s.f_favail >= 0
    assert s.f_namemax == 255
    host = os.statvfs(mnt.parent.parent)  # the disk the state lives on
    assert s.f_blocks * s.f_frsize == pytest.approx(host.f_blocks * host.f_frsize, rel=0.01)
    n = inode_count(mnt)
    (mnt / "one").touch()
    assert inode_count(mnt) == n + 1


# -- durability across umount ---------------------------------------------------------------
def _build_tree(d: Path) -> None:
    """One of everything, with the operations whose results are easy to get wrong."""
    (d / "dir" / "sub").mkdir(parents=True)
    (d / "empty").mkdir(mode=0o700)
    (d / "dir" / "small").write_bytes(b"hello world")
    big = hashlib.sha256(b"seed").digest() * (3 * MiB // 32 + 10)
    (d / "dir" / "big").write_bytes(big)
    pwrite_all(d / "sparse", 5 * GiB + 12345, b"tail-of-a-sparse-file")
    pwrite_all(d / "sparse", 100, b"head")
    pwrite_all(d / "trunc", 0, big[: 2 * MiB + 100])
    truncate(d / "trunc", SMALL_BS + 7)
    truncate(d / "trunc", MiB + 9)
    with open(d / "appended", "ab") as f:
        f.write(b"1" * 70_000)
    with open(d / "appended", "ab") as f:
        f.write(b"2" * 70_000)
    with open(d / "otrunc", "wb") as f:
        f.write(b"old" * 50_000)
    with open(d / "otrunc", "wb") as f:
        f.write(b"new")
    os.link(d / "dir" / "small", d / "hardlink")
    os.symlink("dir/small", d / "symlink")
    os.mkfifo(d / "fifo", 0o600)
    os.mknod(d / "chardev", stat.S_IFCHR | 0o640, os.makedev(1, 5))
    os.chmod(d / "dir" / "small", 0o640)
    os.chown(d / "dir" / "small", USER, USER)
    os.setxattr(d / "dir" / "small", "user.tag", b"\x00\x01value")
    os.setxattr(d / "dir", "user.dirtag", b"d")
    (d / "dir" / "renamed-from").write_bytes(b"moved")
    os.rename(d / "dir" / "renamed-from", d / "dir" / "sub" / "renamed-to")
    (d / "gone").write_bytes(b"unlinked")
    (d / "gone").unlink()
    # an unlinked file open across nothing: closed before the unmount, it must not come back
    fd = os.open(d / "tmpfile", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"temp")
    os.unlink(d / "tmpfile")
    os.close(fd)
    os.utime(d / "dir" / "big", ns=(1_111_111_111_111_111_111, 1_222_222_222_222_222_222))
    os.utime(d / "symlink", ns=(7, 8), follow_symlinks=False)
    os.setxattr(d / "symlink", "trusted.on-link", b"1", follow_symlinks=False)
    odd = os.fsencode(d) + b"/not-utf8-\xff\xfe"
    os.mkdir(odd)
    with open(odd + b"/caf\xe9", "wb") as f:
        f.write(b"latin-1 name")
    os.symlink(b"\xff-target", odd + b"/link")


def _snapshot(root: Path, times: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            info: dict[str, Any] = {
                "mode": st.st_mode,
                "nlink": st.st_nlink,
                "uid": st.st_uid,
                "gid": st.st_gid,
                "size": st.st_size if not stat.S_ISDIR(st.st_mode) else None,
                "rdev": st.st_rdev,
                "xattrs": {
                    k: os.getxattr(p, k, follow_symlinks=False).hex()
                    for k in os.listxattr(p, follow_symlinks=False)
                },
            }
            if times:
                info["mtime"] = st.st_mtime_ns
                info["ctime"] = st.st_ctime_ns
                info["ino"] = st.st_ino
            if stat.S_ISLNK(st.st_mode):
                info["target"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    # sparse files: hash what is around the data, not gigabytes of zeros
                    for off in sorted({0, max(0, st.st_size - 2 * MiB)}):
                        f.seek(off)
                        h.update(f.read(2 * MiB))
                info["sha256"] = h.hexdigest()
            out[rel] = info
    return out


def test_data_and_metadata_survive_umount_and_remount(mounted: Mount, tmp_path: Path) -> None:
    """A 64 KiB-block volume: the whole tree, as Linux has it, comes back after a remount."""
    d = mounted.mountpoint / "tree"
    d.mkdir()
    ref = tmp_path / "ref"
    ref.mkdir()
    _build_tree(d)
    _build_tree(ref)
    before = _snapshot(d, times=True)
    assert _snapshot(d, times=False) == _snapshot(ref, times=False)
    assert cold_read(d / "sparse", 5 * GiB + 12345) == b"tail-of-a-sparse-file"
    inodes = inode_count(mounted.mountpoint)
    mounted.umount()
    mounted.start()
    after = _snapshot(d, times=True)
    diffs = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()}
    diffs = {k: v for k, v in diffs.items() if v[0] != v[1]}
    assert not diffs, json.dumps(diffs, indent=1, default=str)[:4000]
    assert (d / "sparse").stat().st_size == 5 * GiB + 12345 + 21
    assert cold_read(d / "sparse", 5 * GiB + 12345) == b"tail-of-a-sparse-file"
    assert cold_read(d / "sparse", 0, 200) == bytes(100) + b"head" + bytes(96)
    assert inode_count(mounted.mountpoint) == inodes
    log = mounted.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def test_fsynced_data_and_metadata_survive_kill9(mounted: Mount) -> None:
    """What fsync returned for is kept, times included; an unlinked file left open by the
    dead daemon does not come back."""
    d = mounted.mountpoint
    data = os.urandom(300_000)
    with open(d / "durable", "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), 0o640)
        os.setxattr(f.fileno(), "user.k", b"v")
        f.flush()
        os.fsync(f.fileno())
        want = os.fstat(f.fileno())
    base = inode_count(d)
    (d / "removed").mkdir()
    dir_fd = os.open(d / "removed", os.O_RDONLY | os.O_DIRECTORY)
    os.rmdir(d / "removed")
    fd = os.open(d / "tmp", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"x" * 100_000)
        os.fsync(fd)
        os.unlink(d / "tmp")
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)  # the unlink is durable
        os.close(dfd)
        assert mounted.proc is not None
        mounted.kill9()  # the daemon dies with the unlinked file still open
    finally:
        for h in (fd, dir_fd):
            with contextlib.suppress(OSError):
                os.close(h)  # ENOTCONN: the mount it belonged to is gone
    mounted.start()
    assert os.listdir(d) == ["durable"]
    assert inode_count(d) == base
    got = os.stat(d / "durable")
    for field in ("st_mode", "st_size", "st_nlink", "st_mtime_ns", "st_ctime_ns", "st_ino"):
        assert getattr(got, field) == getattr(want, field), field
    assert (d / "durable").read_bytes() == data
    assert os.getxattr(d / "durable", "user.k") == b"v"


def test_replace_by_rename_never_shows_a_new_name_without_its_content(mounted: Mount) -> None:
    """A close commits later, with others (FileSystem.release). Files closed and then
    made durable by an fsync of their directory are there after a kill -9 that follows
    at once. And a file written, closed and renamed over the real one: the rename takes
    the content along first, so after the crash the name never holds an empty or
    partial file."""
    d = mounted.mountpoint
    old, new = os.urandom(70_000), os.urandom(150_000)
    (d / "sub").mkdir()  # not the root, whose fsync drains every buffer (umount's)
    (d / "first").write_bytes(b"")  # a mount's first close is a FLUSH that commits
    dfd = os.open(d / "sub", os.O_RDONLY | os.O_DIRECTORY)
    (d / "sub" / "closed").write_bytes(new)
    os.fsync(dfd)
    mounted.kill9()  # within the close's commit delay: only the fsync can have sent it
    os.close(dfd)
    mounted.start()
    assert (d / "sub" / "closed").read_bytes() == new
    (d / "config").write_bytes(old)
    os.fsync(fd := os.open(d / "config", os.O_RDONLY))
    os.close(fd)
    (d / "config.tmp").write_bytes(new)
    os.rename(d / "config.tmp", d / "config")
    mounted.kill9()  # within the close's commit delay: only the rename can have sent it
    mounted.start()
    assert (d / "config").read_bytes() == new


# -- races the kernel cannot be made to produce on demand: FileSystem in-process ------------
@pytest.fixture
async def fs(tmp_path: Path) -> AsyncIterator[FileSystem]:
    vol = await Volume.create(tmp_path / "state", new_header("direct", 64 * KiB, 1))
    try:
        yield FileSystem(vol)
    finally:
        await vol.close()


async def _new_file(fs: FileSystem, name: bytes = b"f") -> int:
    ino = fs.mknod(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, 0).ino
    fs.open(ino)
    return ino


def _gate_encoding(fs: FileSystem) -> asyncio.Event:
    """Hold every flush in prepare_chunks until the event is set."""
    gate = asyncio.Event()
    real = fs.vol.prepare_chunks

    async def slow(blocks: Any, plans: Any = ()) -> Any:
        await gate.wait()
        return await real(blocks, plans)

    fs.vol.prepare_chunks = slow  # type: ignore[method-assign]
    return gate


async def test_write_racing_a_flush_keeps_both_writes(fs: FileSystem) -> None:
    """A write that read a block's old content while another write to it was flushed
    must not put the old content back over the flushed write."""
    bs = fs.block_size
    ino = await _new_file(fs)
    await fs.write(ino, 0, b"A" * bs)
    await fs.flush(ino)
    fs.cache = ChunkCache(fs.cache.limit)  # the next read of block 0 goes to the journal
    gate = asyncio.Event()
    real = fs.vol.read_chunk
    calls = 0

    async def slow_first_read(cid: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        return await real(cid)

    fs.vol.read_chunk = slow_first_read  # type: ignore[method-assign]
    first = asyncio.ensure_future(fs.write(ino, 10, b"1"))
    await asyncio.sleep(0.01)  # `first` now waits for block 0's old content
    await fs.write(ino, 20, b"2")
    await fs.flush(ino)
    gate.set()
    await first
    await fs.flush(ino)
    data = await fs.read(ino, 0, bs)
    assert data[10:11] == b"1" and data[20:21] == b"2", "a write was lost"
    fs.files.pop(ino)  # read what the catalog holds
    stored = await fs.read(ino, 0, bs)
    assert stored[10:11] == b"1" and stored[20:21] == b"2"
    assert fs.dirty_bytes == 0


async def test_failed_flush_keeps_the_data_dirty(fs: FileSystem) -> None:
    ino = await _new_file(fs)
    await fs.write(ino, 5, b"precious")
    real = fs.vol.prepare_chunks

    async def broken(blocks: Any, plans: Any = ()) -> Any:
        raise OSError(errno.ENOSPC, "disk full")

    fs.vol.prepare_chunks = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await fs.flush(ino)
    assert await fs.read(ino, 0, 100) == bytes(5) + b"precious"
    assert fs.dirty_bytes == 13
    fs.vol.prepare_chunks = real  # type: ignore[method-assign]
    await fs.flush(ino)
    assert fs.dirty_bytes == 0
    await fs.release(ino)
    assert ino not in fs.files
    assert await fs.read(ino, 0, 100) == bytes(5) + b"precious"


async def test_unflushed_size_is_not_committed_by_metadata_changes(fs: FileSystem) -> None:
    """After a crash a file may be cut short, but never padded with zeros nobody wrote."""
    ino = await _new_file(fs)
    await fs.write(ino, 0, b"x" * 100)
    await fs.flush(ino)
    await fs.write(ino, 3 * fs.block_size, b"unflushed")
    await fs.setattr(ino, mode=0o600)
    fs.link(ino, ROOT_INO, b"g")
    fs.setxattr(ino, b"user.a", b"1")
    fs.touch_atime(ino)
    assert fs.getattr(ino).size == 3 * fs.block_size + 9  # what the kernel is told
    assert fs.cat.inode(ino).size == 100  # type: ignore[union-attr]  # what a crash leaves
    await fs.flush(ino)
    assert fs.cat.inode(ino).size == 3 * fs.block_size + 9  # type: ignore[union-attr]


async def test_flush_commits_only_the_size_its_blocks_make(fs: FileSystem) -> None:
    ino = await _new_file(fs)
    await fs.write(ino, 0, b"a" * 100)
    gate = _gate_encoding(fs)
    flushing = asyncio.ensure_future(fs.flush(ino))
    await asyncio.sleep(0.01)
    await fs.write(ino, 5 * fs.block_size, b"late")  # lands while the flush encodes
    gate.set()
    await flushing
    assert fs.cat.inode(ino).size == 100  # type: ignore[union-attr]
    await fs.flush(ino)  # the gate stays open
    assert fs.cat.inode(ino).size == 5 * fs.block_size + 4  # type: ignore[union-attr]
    assert await fs.read(ino, 5 * fs.block_size, 10) == b"late"


async def test_times_with_and_without_the_kernel_owning_them(fs: FileSystem) -> None:
    ino = await _new_file(fs)
    await fs.setattr(ino, mtime_ns=1000, ctime_ns=2000)
    fs.kernel_cmtime = True  # the kernel stamps writes and sends the times itself
    await fs.write(ino, 0, b"x")
    await fs.setattr(ino, size=0)
    await fs.flush(ino)
    i = fs.getattr(ino)
    assert (i.mtime_ns, i.ctime_ns) == (1000, 2000)
    await fs.setattr(ino, mtime_ns=3000, ctime_ns=4000)
    await fs.write(ino, 0, b"y")
    await fs.flush(ino)
    stored = fs.cat.inode(ino)
    assert stored is not None and (stored.mtime_ns, stored.ctime_ns) == (3000, 4000)
    fs.kernel_cmtime = False  # nobody else does: writes and truncates stamp them
    await fs.write(ino, 0, b"z")
    assert fs.getattr(ino).mtime_ns > 4000
    await fs.flush(ino)
    assert fs.cat.inode(ino).mtime_ns > 4000  # type: ignore[union-attr]
    await fs.setattr(ino, mtime_ns=5000, ctime_ns=6000)
    await fs.setattr(ino, size=0)
    i = fs.getattr(ino)
    assert i.mtime_ns > 6000 and i.ctime_ns > 6000


async def test_fsync_waits_for_a_flush_already_in_flight(fs: FileSystem) -> None:
    """fsync must not return while another flush (timer, close) still encodes the data."""
    ino = await _new_file(fs)
    vol = fs.vol
    assert isinstance(vol, Volume)
    data_lsns: list[int] = []
    orig = vol.commit_nowait

    def spy(ops: Any, chunks: Any = ()) -> int:
        ops = list(ops)
        lsn = orig(ops, chunks)
        if any(type(o).__name__ == "SetBlocks" for o in ops):
            data_lsns.append(lsn)
        return lsn

    vol.commit_nowait = spy  # type: ignore[method-assign,assignment]
    await fs.write(ino, 0, os.urandom(1 << 20))
    background = asyncio.ensure_future(fs.flush(ino))  # e.g. the timer's flush_old
    await asyncio.sleep(0)  # it has taken the dirty blocks and hashes them in a thread
    await fs.fsync(ino)
    assert data_lsns and max(data_lsns) <= vol._synced_lsn
    await background


async def test_write_into_a_new_block_being_flushed_keeps_its_start(fs: FileSystem) -> None:
    """A block past the stored size but in flight is not fresh: its start must survive."""
    ino = await _new_file(fs)
    bs = fs.block_size
    first = os.urandom(bs // 2)
    rest = os.urandom(bs // 2)
    await fs.write(ino, 2 * bs, os.urandom(2 * bs))  # enough that encoding goes to a thread
    await fs.write(ino, bs, first)  # block 1, beyond anything stored
    flushing = asyncio.ensure_future(fs.flush(ino))
    await asyncio.sleep(0)  # the flush has taken block 1 and encodes it in a thread
    await fs.write(ino, bs + len(first), rest)
    await flushing
    await fs.flush(ino)
    assert await fs.read(ino, bs, bs) == first + rest


async def test_read_racing_a_flush_in_batches_sees_the_flushed_blocks(fs: FileSystem) -> None:
    """A read that waits for one block while a flush commits a later one must read that
    later block as flushed, not from the block map it took before the commit."""
    bs = fs.block_size
    fs.FLUSH_BATCH = 2 * bs  # type: ignore[misc]  # two batches: blocks 0-1, then 2-3
    fs.WARM_AFTER_FLUSH = 0  # type: ignore[misc]  # flushed blocks not in the chunk cache
    ino = await _new_file(fs)
    old = os.urandom(6 * bs)
    await fs.write(ino, 0, old)
    await fs.flush(ino)
    fs.cache = ChunkCache(fs.cache.limit)
    new = os.urandom(4 * bs)
    await fs.write(ino, 0, new)  # blocks 0-3 dirty, 4-5 only stored
    gates = {name: asyncio.Event() for name in ("prepare1", "prepare2", "warm", "read")}
    real_prepare, real_chunks, real_chunk = (
        fs.vol.prepare_chunks,
        fs.vol.read_chunks,
        fs.vol.read_chunk,
    )
    prepared = 0

    async def prepare(blocks: Any, plans: Any = ()) -> Any:
        nonlocal prepared
        prepared += 1
        await gates[f"prepare{prepared}"].wait()
        return await real_prepare(blocks, plans)

    async def read_chunks(cids: Any) -> Any:
        await gates["warm"].wait()
        return await real_chunks(cids)

    async def read_chunk(cid: bytes) -> bytes:
        await gates["read"].wait()
        return await real_chunk(cid)

    fs.vol.prepare_chunks = prepare  # type: ignore[method-assign]
    fs.vol.read_chunks = read_chunks  # type: ignore[method-assign]
    fs.vol.read_chunk = read_chunk  # type: ignore[method-assign]
    flushing = asyncio.ensure_future(fs.flush(ino))
    await asyncio.sleep(0.01)  # batch 1 (blocks 0-1) is being encoded
    reading = asyncio.ensure_future(fs.read(ino, bs, 5 * bs))
    await asyncio.sleep(0.01)  # the read fetches blocks 4-5
    gates["prepare1"].set()
    await asyncio.sleep(0.01)  # batch 1 committed; batch 2 (blocks 2-3) being encoded
    gates["warm"].set()
    await asyncio.sleep(0.01)  # the read waits for block 1's flushed chunk
    gates["prepare2"].set()
    await asyncio.sleep(0.01)  # batch 2 committed
    gates["read"].set()
    got = await reading
    await flushing
    want = new[bs:] + old[4 * bs :]
    stale = [b + 1 for b in range(5) if got[b * bs : (b + 1) * bs] != want[b * bs : (b + 1) * bs]]
    assert not stale, f"blocks {stale} read as they were before the flushed write"


async def test_sequential_reads_fetch_each_chunk_once(fs: FileSystem) -> None:
    """A read that overtakes its own read-ahead waits for it instead of fetching the same
    chunks again (every duplicate is a second decompress and hash check)."""
    bs = fs.block_size
    ino = await _new_file(fs)
    content = os.urandom(64 * bs)
    await fs.write(ino, 0, content)
    await fs.flush(ino)
    await fs.release(ino)
    fs.cache = ChunkCache(fs.cache.limit)  # cold: every block comes from the journal
    fs.open(ino)
    real = fs.vol.read_chunks
    asked: list[bytes] = []

    async def slow_read_chunks(cids: Sequence[bytes]) -> list[bytes]:
        asked.extend(cids)
        await asyncio.sleep(0.02)  # the next read arrives while this fetch is under way
        return await real(cids)

    fs.vol.read_chunks = slow_read_chunks  # type: ignore[method-assign]
    got = bytearray()
    step = 4 * bs
    for off in range(0, len(content), step):
        got += await fs.read(ino, off, step)
    assert bytes(got) == content
    assert len(asked) == len(set(asked)) == 64, f"{len(asked) - len(set(asked))} fetched twice"


async def test_a_write_fsync_rhythm_ships_the_next_write_ahead_of_its_fsync(
    fs: FileSystem,
) -> None:
    """After KICK_STREAK fsyncs that each followed one write, the next small write is
    committed and handed to the sync targets before it returns; a second write before the fsync is
    not, and ends the rhythm; without sync targets nothing is committed ahead."""
    asked: list[tuple[tuple[int, int], int]] = []
    ino = await _new_file(fs)

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    fs.vol.replicate_soon = lambda pos, lsn: asked.append((pos, lsn))
    for k in range(FileSystem.KICK_STREAK):
        await fs.write(ino, 0, bytes([k]) * 100)
        await settle()
        assert not asked, "shipped ahead before the rhythm was seen"
        await fs.fsync(ino)
    lsn = fs.vol.last_lsn
    await fs.write(ino, 0, b"z" * 100)
    # Before the write is answered, not some time after.
    assert asked and asked[-1][1] == lsn + 1, "the write was not committed and shipped"
    assert isinstance(fs.vol, Volume)
    assert asked[-1][0] == (fs.vol.journal.segno, fs.vol.journal.size)
    assert await fs.read(ino, 0, 100) == b"z" * 100
    # A second write before the fsync is not shipped ahead; and that fsync, after two
    # writes, breaks the rhythm: the next write is not either.
    n = len(asked)
    await fs.write(ino, 0, b"y" * 100)
    await settle()
    await fs.fsync(ino)
    await fs.write(ino, 0, b"x" * 100)
    await settle()
    assert len(asked) == n
    assert await fs.read(ino, 0, 100) == b"x" * 100
    fs.vol.replicate_soon = None
    for k in range(FileSystem.KICK_STREAK + 1):
        await fs.fsync(ino)
        await fs.write(ino, 0, bytes([k]) * 100)
    await settle()
    assert fs.files[ino].dirty, "committed ahead with no sync target to ship to"


async def _closed_commits_done(fs: FileSystem) -> None:
    for _ in range(500):
        if not fs._closed and not fs._closed_task:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the closed files were not committed")


async def test_closed_files_are_committed_together_shortly_after(fs: FileSystem) -> None:
    """An untar: each file written and closed. The closes commit nothing themselves;
    shortly after, one transaction holds all of them. Until then every file reads (and
    stats) from its buffer."""
    want = {await _new_file(fs, b"f%d" % k): os.urandom(1000 + 3000 * k) for k in range(20)}
    for ino, data in want.items():
        await fs.write(ino, 0, data)
    before = fs.vol.last_lsn
    for ino in want:
        await fs.release(ino)
    assert fs.vol.last_lsn == before, "a close committed on its own"
    for ino, data in want.items():
        assert fs.getattr(ino).size == len(data)
        assert await fs.read(ino, 0, len(data)) == data
    await _closed_commits_done(fs)
    assert fs.vol.last_lsn == before + 1, "not one transaction for the closed files"
    assert not fs.files and fs.dirty_bytes == 0
    for ino, data in want.items():  # now from the catalog and the journal
        assert fs.cat.inode(ino).size == len(data)  # type: ignore[union-attr]
        assert await fs.read(ino, 0, len(data)) == data


async def test_closed_files_reopened_unlinked_or_failing_before_their_commit(
    fs: FileSystem,
) -> None:
    """What can happen to a closed file before its commit: written again through a new
    open, unlinked (nothing of it is committed), or its commit fails (the data stays in
    the buffer and the next flush keeps it)."""
    a, b, c = [await _new_file(fs, n) for n in (b"a", b"b", b"c")]
    for ino in (a, b, c):
        await fs.write(ino, 0, b"first")
        await fs.release(ino)
    fs.open(a)
    await fs.write(a, 5, b"+more")
    fs.unlink(ROOT_INO, b"b")
    assert b not in fs.files
    real = fs.vol.prepare_chunks

    async def broken(blocks: Any, plans: Any = ()) -> Any:
        raise OSError(errno.ENOSPC, "disk full")

    fs.vol.prepare_chunks = broken  # type: ignore[method-assign]
    with pytest.raises(OSError):
        await fs.commit_closed()
    fs.vol.prepare_chunks = real  # type: ignore[method-assign]
    assert await fs.read(c, 0, 10) == b"first"  # still in its buffer, still dirty
    await fs.flush(c)
    await fs.release(a)
    await _closed_commits_done(fs)
    assert not fs.files and fs.dirty_bytes == 0
    assert fs.cat.inode(b) is None
    assert await fs.read(a, 0, 20) == b"first+more"
    assert await fs.read(c, 0, 20) == b"first"


async def test_commit_closed_returns_only_once_earlier_calls_have_committed(
    fs: FileSystem,
) -> None:
    """A rename calls commit_closed() so that the renamed file's content is committed
    first. Should the background commit have taken that file already and be waiting
    for its encoding, the rename's call must wait for it, not find nothing to do."""
    ino = await _new_file(fs)
    await fs.write(ino, 0, b"data")
    await fs.release(ino)
    gate = _gate_encoding(fs)
    first = asyncio.ensure_future(fs.commit_closed())
    await asyncio.sleep(0.02)  # it has taken the file and waits for the encoder
    assert not fs._closed
    second = asyncio.ensure_future(fs.commit_closed())  # what a rename does first
    await asyncio.sleep(0.02)
    assert not second.done(), "returned while the file's commit was still on its way"
    gate.set()
    await second
    assert fs.cat.inode(ino).size == 4  # type: ignore[union-attr]
    await first
    await _closed_commits_done(fs)
