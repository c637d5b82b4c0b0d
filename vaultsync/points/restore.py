"""`vaultsync restore`: copy a file or tree, as it was at a point, out of a target.

The point is rebuilt from the target (recovery.py) and read in-process through
`FileSystem`, so restore needs no mount and no root. Files are written to a
temporary name and renamed into place when complete, with modes, owners (when
run as root), times and xattrs set after the data; hard links are recreated
as links. A file already at DEST with the same size and mtime is skipped,
which is what makes an interrupted restore resumable. Anything else already
at DEST is refused unless `force`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from vaultsync.config import Config
from vaultsync.engine.catalog import Inode
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.posix import FsError
from vaultsync.errors import VaultsyncError
from vaultsync.format.txn import ROOT_INO
from vaultsync.points.recovered import RecoveredVolume
from vaultsync.points.recovery import SegmentCache, parse_point, rebuild
from vaultsync.store.objectstore import ObjectStore
from vaultsync.store.ratelimit import RateLimiter


class RestoreError(VaultsyncError):
    pass


@dataclass
class RestoreReport:
    lsn: int = 0
    files: int = 0
    dirs: int = 0
    links: int = 0
    symlinks: int = 0
    special: int = 0
    skipped: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)


def resolve_path(fs: FileSystem, path: str) -> Inode:
    """The inode at `path` in the volume; '..' never climbs above the root."""
    ino = ROOT_INO
    node = fs.getattr(ino)
    for part in PurePosixPath("/" + path).parts[1:]:
        if part in (".", ""):
            continue
        try:
            node = fs.lookup(ino, os.fsencode(part))
        except FsError as e:
            why = os.strerror(e.errno)
            raise RestoreError(f"{path!r} does not exist at that point ({why})") from None
        ino = node.ino
    return node


def _set_meta_fd(fd: int, node: Inode, xattrs: dict[bytes, bytes]) -> None:
    """As _set_meta, through an open file: nothing a path could be redirected to."""
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.fchown(fd, node.uid, node.gid)
    os.fchmod(fd, stat.S_IMODE(node.mode))
    for name, value in xattrs.items():
        with contextlib.suppress(OSError):  # e.g. a DEST filesystem without xattrs
            os.setxattr(fd, name, value)
    os.utime(fd, ns=(node.atime_ns, node.mtime_ns))


def _set_meta(path: Path, node: Inode, xattrs: dict[bytes, bytes], symlink: bool) -> None:
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(path, node.uid, node.gid, follow_symlinks=not symlink)
    if not symlink:
        os.chmod(path, stat.S_IMODE(node.mode))
    for name, value in xattrs.items():
        with contextlib.suppress(OSError):  # e.g. a DEST filesystem without xattrs
            os.setxattr(path, name, value, follow_symlinks=not symlink)
    os.utime(path, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=not symlink)


async def _all_or_nothing(coros: list[Coroutine[object, object, None]]) -> None:
    """Run them together; the first failure (or a cancel) stops the others before it is
    raised, so a restore that has failed leaves nothing still writing behind it."""
    if not coros:
        return
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if not t.cancelled() and (e := t.exception()) is not None:
            raise e


class _Restorer:
    def __init__(
        self,
        fs: FileSystem,
        force: bool,
        parallel: int,
        progress: Callable[[int], None] | None,
        limiter: RateLimiter,
        confine: Sequence[Path] = (),
    ) -> None:
        self.fs = fs
        self.force = force
        self.sem = asyncio.Semaphore(parallel)
        self.limiter = limiter
        self.confine = [os.path.realpath(r) for r in confine]
        self.progress = progress
        self.report = RestoreReport()
        # ino -> (first path restored, set once it is in place): hard links link to it
        self.linked: dict[int, tuple[Path, asyncio.Event]] = {}
        self.dir_meta: list[tuple[Path, Inode, dict[bytes, bytes]]] = []

    def _check_inside(self, dest: Path, real: str | None = None) -> None:
        """With `confine` (the API's restore roots), every name is created under one of them.

        Checked again before each file, directory and link, not only when the
        restore starts: a symlink swapped into the destination tree while the
        restore runs would otherwise carry the rest of it elsewhere. `real` is
        where an opened directory really is (its descriptor's target).
        """
        if not self.confine:
            return
        real = real or os.path.realpath(dest.parent)
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.confine):
            raise RestoreError(
                f"{dest.parent} now leads to {real}, outside the restore roots (a symlink "
                "appeared in the destination during the restore); the restore was stopped"
            )

    def _open_parent(self, dest: Path) -> int:
        """The directory `dest` goes in, opened and then checked: whatever its path
        leads to later, a file made relative to this descriptor lands in the
        directory that was checked."""
        dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        if not self.confine:
            return dfd
        try:
            self._check_inside(dest, os.readlink(f"/proc/self/fd/{dfd}"))
        except BaseException:
            os.close(dfd)
            raise
        return dfd

    def _check_free(self, dest: Path, node: Inode) -> bool:
        """True to write `dest`; False to skip it (already restored)."""
        self._check_inside(dest)
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(node.mode):
            return True
        if (
            stat.S_ISREG(st.st_mode)
            and stat.S_ISREG(node.mode)
            and st.st_size == node.size
            and st.st_mtime_ns == node.mtime_ns
        ):
            return False
        if (
            stat.S_ISLNK(st.st_mode)
            and stat.S_ISLNK(node.mode)
            and os.fsencode(os.readlink(dest)) == self.fs.readlink(node.ino)
        ):
            return False
        if stat.S_IFMT(st.st_mode) == stat.S_IFMT(node.mode) and not stat.S_ISREG(node.mode):
            return False  # the same fifo or device node
        if not self.force:
            raise RestoreError(
                f"{dest} already exists and differs from the restored version; "
                "use --force to overwrite, or restore somewhere else"
            )
        if stat.S_ISDIR(st.st_mode):
            raise RestoreError(f"{dest} is a directory; it will not be replaced by a file")
        dest.unlink()
        return True

    async def file(self, node: Inode, dest: Path) -> None:
        first = self.linked.get(node.ino)
        if first is not None:
            await first[1].wait()
            with contextlib.suppress(OSError):
                if os.path.samefile(dest, first[0]):
                    return  # restored by an earlier run
            if self._check_free(dest, node):
                os.link(first[0], dest)
                self.report.links += 1
            return
        done = asyncio.Event()
        self.linked[node.ino] = (dest, done)
        try:
            await self._copy(node, dest)
        finally:
            done.set()

    async def _copy(self, node: Inode, dest: Path) -> None:
        async with self.sem:
            if not self._check_free(dest, node):
                self.report.skipped += 1
                return
            # Everything below is relative to the parent's descriptor, checked once
            # opened (the copy waited for its turn: check again, then pin it).
            dfd = self._open_parent(dest)
            tmp = f".vsrestore-{secrets.token_hex(6)}"
            try:
                fd = os.open(
                    tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd
                )
                try:
                    with os.fdopen(fd, "wb") as out:
                        # The write runs in a thread while the next batch is fetched.
                        async for data in self.fs.stream(node.ino):
                            await self.limiter.take(len(data))
                            await asyncio.to_thread(out.write, data)
                            self.report.bytes += len(data)
                            if self.progress is not None:
                                self.progress(len(data))
                        out.truncate(node.size)  # a sparse tail
                        out.flush()
                        _set_meta_fd(out.fileno(), node, self._xattrs(node.ino))
                    os.replace(tmp, dest.name, src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=dfd)
                    raise
            finally:
                os.close(dfd)
            self.report.files += 1

    def _xattrs(self, ino: int) -> dict[bytes, bytes]:
        return {n: self.fs.getxattr(ino, n) for n in self.fs.listxattr(ino)}

    async def tree(self, node: Inode, dest: Path) -> None:
        if stat.S_ISDIR(node.mode):
            if self._check_free(dest, node):
                dest.mkdir(exist_ok=True)
            self.report.dirs += 1
            tasks = []
            offset = 0
            while True:
                entries = self.fs.readdir(node.ino, offset)
                if not entries:
                    break
                for name, child, nxt in entries:
                    offset = nxt
                    if name in (b".", b".."):
                        continue
                    tasks.append(self.tree(child, dest / os.fsdecode(name)))
            await _all_or_nothing(tasks)
            # Directory times last: writing inside a directory changes its mtime.
            self.dir_meta.append((dest, node, self._xattrs(node.ino)))
        elif stat.S_ISREG(node.mode):
            await self.file(node, dest)
        elif stat.S_ISLNK(node.mode):
            if self._check_free(dest, node):
                os.symlink(self.fs.readlink(node.ino), dest)
                _set_meta(dest, node, self._xattrs(node.ino), True)
                self.report.symlinks += 1
        else:
            if self._check_free(dest, node):
                try:
                    os.mknod(dest, node.mode, node.rdev)
                    _set_meta(dest, node, self._xattrs(node.ino), False)
                    self.report.special += 1
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EACCES):
                        raise
                    self.report.errors.append(f"{dest}: cannot create device node (not root)")


async def restore(
    cfg: Config,
    target: str,
    at: str | None,
    path: str,
    dest: Path,
    passphrase: str | None,
    *,
    force: bool = False,
    parallel: int = 8,
    bwlimit: float | None = None,
    confine: Sequence[Path] = (),
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> RestoreReport:
    """`bwlimit` caps the bytes written per second, all files together (None: no cap);
    with `confine`, nothing is created outside those directories (symlinks followed)."""
    point = parse_point(at)
    with tempfile.TemporaryDirectory(prefix="vaultsync-restore-") as tmp:
        async with ObjectStore(cfg.target(target)) as store:
            cache = SegmentCache(Path(tmp) / "segments", 2 << 30)
            rebuilt, keys = await rebuild(
                store,
                Path(tmp),
                passphrase,
                point,
                cache,
                durable=False,
                volume_name=cfg.volume.name,
            )
            vol = RecoveredVolume(Path(tmp), rebuilt, keys, store, cache)
            try:
                fs = FileSystem(vol)
                node = resolve_path(fs, path)
                if total is not None:
                    total(_tree_bytes(fs, node))
                r = _Restorer(fs, force, parallel, progress, RateLimiter(bwlimit), confine)
                r.report.lsn = rebuilt.lsn
                dest = dest.resolve()
                if stat.S_ISDIR(node.mode) or not dest.is_dir():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    out = dest
                else:
                    out = dest / PurePosixPath(path).name
                await r.tree(node, out)
                for d, n, x in reversed(r.dir_meta):
                    _set_meta(d, n, x, False)
                return r.report
            finally:
                await vol.close()


def _tree_bytes(fs: FileSystem, node: Inode) -> int:
    if not stat.S_ISDIR(node.mode):
        return node.size if stat.S_ISREG(node.mode) else 0
    total, offset = 0, 0
    while True:
        entries = fs.readdir(node.ino, offset)
        if not entries:
            return total
        for name, child, nxt in entries:
            offset = nxt
            if name not in (b".", b".."):
                total += _tree_bytes(fs, child)
