"""Reference-model test of the mount: the same random operations on the mount and on a
plain local directory must give the same results, errnos and trees.

A seeded generator picks operations over a small namespace (four names, depth up to
three) so that names collide often: creates with every O_CREAT/O_EXCL/O_TRUNC/O_APPEND
combination, writes at random offsets (holes, block boundaries), reads, truncates,
mkdir/rmdir/unlink, rename (with RENAME_NOREPLACE and RENAME_EXCHANGE too), hard and
symbolic links, chmod and user xattrs, with up to eight files held open across steps
(and unlinked while open). Every step compares the return value or errno, then lstat
of the paths it touched; every few steps, and around an unmount + remount in the
middle of the run, the whole tree is compared: names, types, modes, sizes, link
counts, hard-link groups, contents, symlink targets and xattrs.

A failure names the seed; rerun it with VAULTSYNC_MODEL_SEED=<seed> (and the same
VAULTSYNC_MODEL_STEPS) to replay the same operations.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import random
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tests.support.mounting import Mount

NAMES = ("a", "b", "c", "d")
MAX_DEPTH = 3
XATTR_NAMES = ("user.a", "user.b", "user.c")
KIB = 1024
MIB = 1024 * KIB
CHUNK_SIZES = (4 * KIB, 64 * KIB, MIB)  # the volume's block size: one per run, from the seed
MAX_FILE = 4 * MIB
MAX_OPEN = 8
TREE_EVERY = 40
DEFAULT_STEPS = 6000
HISTORY_SHOWN = 40

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
XATTR_CREATE = getattr(os, "XATTR_CREATE", 1)
XATTR_REPLACE = getattr(os, "XATTR_REPLACE", 2)

_libc = ctypes.CDLL(None, use_errno=True)

# ("ok", value) or ("err", "ENOENT")
Outcome = tuple[str, Any]


def renameat2(src: Path, dst: Path, flags: int) -> None:
    r = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src))


def attempt(fn: Callable[[], Any]) -> Outcome:
    try:
        return ("ok", fn())
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))


def show(value: Any) -> str:
    if isinstance(value, bytes | bytearray) and len(value) > 24:
        return f"<{len(value)} bytes sha256={hashlib.sha256(value).hexdigest()[:12]}>"
    return repr(value)


def show_outcome(o: Outcome) -> str:
    return show(o[1]) if o[0] == "ok" else o[1]


def first_difference(a: bytes, b: bytes, block: int = 64 * KIB) -> str:
    n = min(len(a), len(b))
    for start in range(0, n, 4096):
        if a[start : start + 4096] != b[start : start + 4096]:
            i = next(j for j in range(start, min(start + 4096, n)) if a[j] != b[j])
            return (
                f"lengths {len(a)} vs {len(b)}, first difference at offset {i} "
                f"(block {i // block} +{i % block}): expected {a[i : i + 8].hex()} "
                f"got {b[i : i + 8].hex()}"
            )
    return f"lengths {len(a)} vs {len(b)}, equal over the common prefix"


def parent_of(rel: str) -> str:
    return rel.rpartition("/")[0]


def stat_summary(st: os.stat_result) -> dict[str, Any]:
    """What must match between the mount and a local disk (dir sizes, times, inos don't)."""
    fmt = stat.S_IFMT(st.st_mode)
    d: dict[str, Any] = {
        "type": stat.filemode(fmt)[0],
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "nlink": st.st_nlink,
    }
    if fmt != stat.S_IFDIR:
        d["size"] = st.st_size
    return d


def read_all(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        parts = []
        while chunk := os.read(fd, MIB):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def snapshot(root: Path) -> tuple[dict[str, dict[str, Any]], set[frozenset[str]]]:
    """Every entry under `root` (not following symlinks) and the hard-link groups."""
    entries: dict[str, dict[str, Any]] = {}
    by_ino: dict[int, list[str]] = {}

    def walk(rel: str) -> None:
        names = os.listdir(root / rel if rel else root)
        if len(names) != len(set(names)):
            entries[f"{rel}/<duplicates>"] = {"names": sorted(names)}
        for name in sorted(names):
            r = f"{rel}/{name}" if rel else name
            p = root / r
            st = os.lstat(p)
            rec = stat_summary(st)
            if stat.S_ISREG(st.st_mode):
                rec["data"] = read_all(p)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(p)
            if not stat.S_ISLNK(st.st_mode):
                rec["xattrs"] = {
                    k: os.getxattr(p, k, follow_symlinks=False)
                    for k in sorted(os.listxattr(p, follow_symlinks=False))
                    if k.startswith("user.")
                }
            entries[r] = rec
            if stat.S_ISDIR(st.st_mode):
                walk(r)
            else:
                by_ino.setdefault(st.st_ino, []).append(r)

    walk("")
    entries["<root>"] = {"nlink": os.lstat(root).st_nlink}
    groups = {frozenset(v) for v in by_ino.values() if len(v) > 1}
    return entries, groups


def tree_differences(
    ref: tuple[dict[str, dict[str, Any]], set[frozenset[str]]],
    got: tuple[dict[str, dict[str, Any]], set[frozenset[str]]],
    block: int,
) -> list[str]:
    out = []
    (re, rg), (me, mg) = ref, got
    for path in sorted(re.keys() | me.keys()):
        a, b = re.get(path), me.get(path)
        if a is None:
            out.append(f"{path}: unexpected entry on the mount {show_record(b)}")
        elif b is None:
            out.append(f"{path}: missing on the mount (expected {show_record(a)})")
        else:
            for k in sorted(a.keys() | b.keys()):
                if a.get(k) == b.get(k):
                    continue
                if k == "data":
                    out.append(f"{path}: contents differ: {first_difference(a[k], b[k], block)}")
                else:
                    out.append(f"{path}: {k} expected {show(a.get(k))}, got {show(b.get(k))}")
    if rg != mg:
        fmt = sorted(sorted(g) for g in rg)
        out.append(f"hard-link groups expected {fmt}, got {sorted(sorted(g) for g in mg)}")
    return out


def show_record(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "None"
    return "{" + ", ".join(f"{k}: {show(v)}" for k, v in rec.items()) + "}"


def open_flags_name(flags: int) -> str:
    acc = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}
    names = [acc[flags & os.O_ACCMODE]]
    for f in ("O_CREAT", "O_EXCL", "O_TRUNC", "O_APPEND", "O_NOFOLLOW", "O_DIRECTORY"):
        if flags & getattr(os, f):
            names.append(f)
    return "|".join(names)


@dataclass
class Handle:
    hid: int
    path: str
    flags: int
    ref_fd: int
    mnt_fd: int

    def __str__(self) -> str:
        return f"h{self.hid}({self.path})"


class Mismatch(AssertionError):
    pass


class Model:
    def __init__(self, mount: Mount, ref: Path, seed: int, steps: int, block: int) -> None:
        self.mount = mount
        self.block = block
        self.ref = ref
        self.mnt = mount.mountpoint
        self.seed = seed
        self.steps = steps
        self.rng = random.Random(seed)
        self.handles: dict[int, Handle] = {}
        self.next_hid = 0
        self.step = 0
        self.history: list[str] = []
        self.ok_counts: Counter[str] = Counter()
        self.err_counts: Counter[str] = Counter()
        self.ops: list[tuple[Callable[[], None], int]] = [
            (self.op_open, 14),
            (self.op_close, 6),
            (self.op_pwrite, 16),
            (self.op_write, 6),
            (self.op_pread, 8),
            (self.op_read, 3),
            (self.op_ftruncate, 4),
            (self.op_truncate, 4),
            (self.op_fstat, 3),
            (self.op_fsync, 2),
            (self.op_drop_cache, 4),
            (self.op_fattr, 3),
            (self.op_unlink_open, 3),
            (self.op_mkdir, 9),
            (self.op_rmdir, 5),
            (self.op_unlink, 7),
            (self.op_rename, 10),
            (self.op_link, 6),
            (self.op_symlink, 4),
            (self.op_chmod, 4),
            (self.op_setxattr, 5),
            (self.op_removexattr, 3),
            (self.op_getxattr, 2),
            (self.op_listdir, 2),
            (self.op_stat, 2),
            (self.op_readlink, 1),
        ]

    # -- reporting ------------------------------------------------------------------
    def fail(self, what: str) -> None:
        tail = "\n  ".join(self.history[-HISTORY_SHOWN:])
        raise Mismatch(
            f"mount differs from the local reference at step {self.step} "
            f"(VAULTSYNC_MODEL_SEED={self.seed} VAULTSYNC_MODEL_STEPS={self.steps}):\n"
            f"{what}\nlast operations (expected result from the local directory):\n  {tail}"
        )

    def record(self, desc: str, ref: Outcome) -> None:
        self.history.append(f"#{self.step} {desc} -> {show_outcome(ref)}")
        kind = desc.split(" ", 1)[0]
        (self.ok_counts if ref[0] == "ok" else self.err_counts)[kind] += 1

    def expect_same(self, desc: str, ref: Outcome, got: Outcome) -> None:
        self.record(desc, ref)
        if ref == got:
            return
        detail = ""
        if ref[0] == got[0] == "ok" and isinstance(ref[1], bytes) and isinstance(got[1], bytes):
            detail = f" ({first_difference(ref[1], got[1], self.block)})"
        self.fail(f"{desc}: expected {show_outcome(ref)}, got {show_outcome(got)}{detail}")

    def on_paths(self, desc: str, fn: Callable[[Path], Any], touched: list[str]) -> Outcome:
        """Run fn(root) on both trees, compare, then compare lstat of the touched paths."""
        ref = attempt(lambda: fn(self.ref))
        got = attempt(lambda: fn(self.mnt))
        self.expect_same(desc, ref, got)
        self.compare_paths(touched)
        return ref

    def on_handle(self, desc: str, h: Handle, fn: Callable[[int], Any]) -> Outcome:
        ref = attempt(lambda: fn(h.ref_fd))
        got = attempt(lambda: fn(h.mnt_fd))
        self.expect_same(desc, ref, got)
        self.compare_handle(h)
        return ref

    def lstat_of(self, root: Path, rel: str) -> Outcome:
        return attempt(lambda: stat_summary(os.lstat(root / rel if rel else root)))

    def compare_paths(self, rels: list[str]) -> None:
        for rel in dict.fromkeys(rels):
            ref, got = self.lstat_of(self.ref, rel), self.lstat_of(self.mnt, rel)
            if rel == "" and ref[0] == got[0] == "ok":  # the roots' own modes are not modelled
                ref, got = ("ok", ref[1]["nlink"]), ("ok", got[1]["nlink"])
            if ref != got:
                self.fail(
                    f"after {self.history[-1]}: lstat({rel or '<root>'}) "
                    f"expected {show_outcome(ref)}, got {show_outcome(got)}"
                )

    def compare_handle(self, h: Handle) -> None:
        ref = attempt(lambda: stat_summary(os.fstat(h.ref_fd)))
        got = attempt(lambda: stat_summary(os.fstat(h.mnt_fd)))
        if ref != got:
            self.fail(
                f"after {self.history[-1]}: fstat({h}) "
                f"expected {show_outcome(ref)}, got {show_outcome(got)}"
            )

    def compare_trees(self, when: str) -> None:
        diffs = tree_differences(snapshot(self.ref), snapshot(self.mnt), self.block)
        if diffs:
            self.fail(f"trees differ {when}:\n    " + "\n    ".join(diffs[:30]))

    # -- choosing -------------------------------------------------------------------
    def existing(self) -> list[str]:
        """Entries of the reference tree: sorted, symlinks not followed (so seeds replay)."""
        out: list[str] = []

        def walk(rel: str) -> None:
            for name in sorted(os.listdir(self.ref / rel if rel else self.ref)):
                r = f"{rel}/{name}" if rel else name
                out.append(r)
                if stat.S_ISDIR(os.lstat(self.ref / r).st_mode):
                    walk(r)

        walk("")
        return out

    def random_path(self) -> str:
        depth = self.rng.choices((1, 2, 3), weights=(45, 35, 20))[0]
        return "/".join(self.rng.choice(NAMES) for _ in range(min(depth, MAX_DEPTH)))

    def pick_path(self, existing_bias: float = 0.6) -> str:
        ex = self.existing()
        if ex and self.rng.random() < existing_bias:
            return self.rng.choice(ex)
        return self.random_path()

    def pick_new_path(self) -> str:
        """A name in an existing directory, mostly (or anywhere in the namespace)."""
        dirs = [""] + [p for p in self.existing() if stat.S_ISDIR(os.lstat(self.ref / p).st_mode)]
        dirs = [d for d in dirs if d.count("/") < MAX_DEPTH - 1 or d == ""]
        if self.rng.random() < 0.8:
            d = self.rng.choice(dirs)
            name = self.rng.choice(NAMES)
            return f"{d}/{name}" if d else name
        return self.pick_path()

    def pick_file(self) -> str:
        """An existing non-directory, if there is one."""
        files = [p for p in self.existing() if not self.ref.joinpath(p).is_dir()]
        return self.rng.choice(files) if files else self.pick_path()

    def pick_mode(self) -> int:
        return self.rng.choice(
            (0o644, 0o600, 0o755, 0o444, 0o000, 0o700, self.rng.randrange(0o1000))
        )

    def pick_handle(self) -> Handle | None:
        if not self.handles:
            return None
        return self.handles[self.rng.choice(sorted(self.handles))]

    def ref_size(self, h: Handle) -> int:
        try:
            return os.fstat(h.ref_fd).st_size
        except OSError:
            return 0

    def pick_offset(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.25:
            off = self.rng.randrange(size + self.block)
        elif r < 0.45:  # straddling a block (or MiB) boundary
            unit = self.rng.choice((self.block, self.block, MIB))
            k = self.rng.randrange(1, MAX_FILE // unit)
            off = k * unit + self.rng.randint(-300, 300)
        elif r < 0.6:
            off = size
        elif r < 0.75:  # past EOF: a hole
            off = size + self.rng.randint(1, MIB + self.block)
        else:
            off = self.rng.randrange(3 * MIB)
        return max(0, min(off, MAX_FILE - 1))

    def pick_length(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(1, 4096)
        if r < 0.85:
            return self.rng.randint(1, 150 * KIB)
        return self.rng.randint(64 * KIB, MIB + 3 * self.block)

    def pick_size(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.15:
            return 0
        if r < 0.45:
            return self.rng.randrange(size + 1)
        if r < 0.65:
            unit = self.rng.choice((self.block, MIB))
            return max(0, self.rng.randrange(1, MAX_FILE // unit) * unit + self.rng.randint(-3, 3))
        if r < 0.85:
            return min(MAX_FILE, size + self.rng.randint(1, MIB))
        return self.rng.randrange(MAX_FILE)

    # -- operations on paths ----------------------------------------------------------
    def op_open(self) -> None:
        if len(self.handles) >= MAX_OPEN:
            self.op_close()
        path = self.pick_new_path() if self.rng.random() < 0.4 else self.pick_path()
        flags = self.rng.choice((os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR))
        for f, p in (
            (os.O_CREAT, 0.6),
            (os.O_EXCL, 0.2),
            (os.O_TRUNC, 0.2),
            (os.O_APPEND, 0.25),
            (os.O_NOFOLLOW, 0.04),
            (os.O_DIRECTORY, 0.03),
        ):
            if self.rng.random() < p:
                flags |= f
        mode = self.pick_mode()
        desc = f"open {path} {open_flags_name(flags)} {oct(mode)}"
        ref = attempt(lambda: os.open(self.ref / path, flags, mode))
        got = attempt(lambda: os.open(self.mnt / path, flags, mode))
        if ref[0] == "ok" and got[0] == "ok":
            h = Handle(self.next_hid, path, flags, ref[1], got[1])
            self.next_hid += 1
            self.handles[h.hid] = h
            desc += f" as h{h.hid}"
        else:
            for o in (ref, got):
                if o[0] == "ok":
                    os.close(o[1])
        self.expect_same(
            desc,
            ("ok", "fd") if ref[0] == "ok" else ref,
            ("ok", "fd") if got[0] == "ok" else got,
        )
        self.compare_paths([path, parent_of(path)])

    def op_mkdir(self) -> None:
        path = self.pick_new_path()
        mode = self.rng.choice((0o755, 0o700, 0o777, 0o2775, 0o1777, self.rng.randrange(0o1000)))
        self.on_paths(
            f"mkdir {path} {oct(mode)}",
            lambda root: os.mkdir(root / path, mode),
            [path, parent_of(path)],
        )

    def op_rmdir(self) -> None:
        path = self.pick_path(0.7)
        self.on_paths(f"rmdir {path}", lambda root: os.rmdir(root / path), [path, parent_of(path)])

    def op_unlink(self) -> None:
        path = self.pick_path(0.8)
        self.on_paths(
            f"unlink {path}", lambda root: os.unlink(root / path), [path, parent_of(path)]
        )

    def op_rename(self) -> None:
        src = self.pick_path(0.85)
        # Half the time over an existing entry, mostly.
        dst = self.pick_path(0.9) if self.rng.random() < 0.5 else self.pick_new_path()
        r = self.rng.random()
        flags = RENAME_NOREPLACE if r < 0.1 else RENAME_EXCHANGE if r < 0.2 else 0
        name = {0: "rename", RENAME_NOREPLACE: "rename NOREPLACE", RENAME_EXCHANGE: "exchange"}

        def fn(root: Path) -> None:
            if flags:
                renameat2(root / src, root / dst, flags)
            else:
                os.rename(root / src, root / dst)

        self.on_paths(
            f"{name[flags]} {src} -> {dst}",
            fn,
            [src, dst, parent_of(src), parent_of(dst)],
        )
        # A renamed directory moved its subtree: look at what lies below the new name.
        if self.ref.joinpath(dst).is_dir() and not self.ref.joinpath(dst).is_symlink():
            below = [p for p in self.existing() if p.startswith(dst + "/")]
            self.compare_paths(below)

    def op_link(self) -> None:
        src = self.pick_file() if self.rng.random() < 0.8 else self.pick_path(0.9)
        dst = self.pick_new_path()
        self.on_paths(
            f"link {src} -> {dst}",
            lambda root: os.link(root / src, root / dst),
            [src, dst, parent_of(dst)],
        )

    def op_symlink(self) -> None:
        path = self.pick_new_path()
        r = self.rng.random()
        if r < 0.1:
            target = path.rpartition("/")[2]  # itself: ELOOP when followed
        elif r < 0.2:
            target = "nowhere"
        else:  # relative, downward only: it resolves inside whichever tree holds it
            target = "/".join(self.rng.choice(NAMES) for _ in range(self.rng.randint(1, 2)))
        self.on_paths(
            f"symlink {path} -> {target}",
            lambda root: os.symlink(target, root / path),
            [path, parent_of(path)],
        )

    def op_chmod(self) -> None:
        path = self.pick_path(0.85)
        mode = self.rng.choice((0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o1777))
        if self.rng.random() < 0.3:
            mode = self.rng.randrange(0o10000)
        self.on_paths(f"chmod {path} {oct(mode)}", lambda root: os.chmod(root / path, mode), [path])

    def op_truncate(self) -> None:
        path = self.pick_path(0.85)
        try:
            cur = os.stat(self.ref / path).st_size
        except OSError:
            cur = 0
        size = self.pick_size(cur)
        self.on_paths(
            f"truncate {path} {size}", lambda root: os.truncate(root / path, size), [path]
        )

    def op_setxattr(self) -> None:
        path = self.pick_path(0.85)
        name = self.rng.choice(XATTR_NAMES)
        value = self.rng.randbytes(self.rng.choice((0, 1, 7, 100, self.rng.randrange(2000))))
        flags = self.rng.choice((0, 0, XATTR_CREATE, XATTR_REPLACE))
        fname = {0: "", XATTR_CREATE: " CREATE", XATTR_REPLACE: " REPLACE"}[flags]
        self.on_paths(
            f"setxattr {path} {name}={show(value)}{fname}",
            lambda root: os.setxattr(root / path, name, value, flags),
            [path],
        )

    def op_removexattr(self) -> None:
        path = self.pick_path(0.85)
        name = self.rng.choice(XATTR_NAMES)
        self.on_paths(
            f"removexattr {path} {name}", lambda root: os.removexattr(root / path, name), [path]
        )

    def op_getxattr(self) -> None:
        path = self.pick_path(0.85)
        if self.rng.random() < 0.5:
            name = self.rng.choice(XATTR_NAMES)
            self.on_paths(
                f"getxattr {path} {name}", lambda root: os.getxattr(root / path, name), [path]
            )
        else:
            self.on_paths(
                f"listxattr {path}",
                lambda root: sorted(x for x in os.listxattr(root / path) if x.startswith("user.")),
                [path],
            )

    def op_listdir(self) -> None:
        path = self.pick_path(0.7) if self.rng.random() < 0.8 else ""
        self.on_paths(
            f"listdir {path or '<root>'}",
            lambda root: sorted(os.listdir(root / path if path else root)),
            [path],
        )

    def op_stat(self) -> None:
        path = self.pick_path(0.8)
        self.on_paths(f"stat {path}", lambda root: stat_summary(os.stat(root / path)), [path])

    def op_readlink(self) -> None:
        path = self.pick_path(0.9)
        self.on_paths(f"readlink {path}", lambda root: os.readlink(root / path), [path])

    # -- operations on open files -------------------------------------------------------
    def op_close(self) -> None:
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        del self.handles[h.hid]
        ref = attempt(lambda: os.close(h.ref_fd))
        got = attempt(lambda: os.close(h.mnt_fd))
        self.expect_same(f"close {h}", ref, got)
        self.compare_paths([h.path])
        return None

    def op_pwrite(self) -> None:
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        off = self.pick_offset(self.ref_size(h))
        data = self.rng.randbytes(min(self.pick_length(), MAX_FILE - off))
        self.on_handle(
            f"pwrite {h} off={off} len={len(data)}", h, lambda fd: os.pwrite(fd, data, off)
        )
        return None

    def op_write(self) -> None:
        """write() at the file position, after an lseek now and then: O_APPEND's business."""
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        # (Not on directories: ext4 answers lseek(SEEK_END) there with a hash-order cookie.)
        if self.rng.random() < 0.5 and not stat.S_ISDIR(os.fstat(h.ref_fd).st_mode):
            whence = self.rng.choice((os.SEEK_SET, os.SEEK_END))
            off = self.pick_offset(self.ref_size(h)) if whence == os.SEEK_SET else 0
            self.on_handle(f"lseek {h} {off} {whence}", h, lambda fd: os.lseek(fd, off, whence))
        data = self.rng.randbytes(self.pick_length() // 4 + 1)
        if self.ref_size(h) + len(data) > MAX_FILE:
            return None
        self.on_handle(f"write {h} len={len(data)}", h, lambda fd: os.write(fd, data))
        self.on_handle(f"tell {h}", h, lambda fd: os.lseek(fd, 0, os.SEEK_CUR))
        return None

    def op_pread(self) -> None:
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        size = self.ref_size(h)
        off = self.pick_offset(size) if self.rng.random() < 0.7 else self.rng.randrange(size + 1)
        n = self.pick_length()
        self.on_handle(f"pread {h} off={off} len={n}", h, lambda fd: os.pread(fd, n, off))
        return None

    def op_read(self) -> None:
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        n = self.pick_length()
        self.on_handle(f"read {h} len={n}", h, lambda fd: os.read(fd, n))
        return None

    def op_ftruncate(self) -> None:
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        size = self.pick_size(self.ref_size(h))
        self.on_handle(f"ftruncate {h} {size}", h, lambda fd: os.ftruncate(fd, size))
        return None

    def op_fstat(self) -> None:
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        self.on_handle(f"fstat {h}", h, lambda fd: stat_summary(os.fstat(fd)))
        return None

    def op_fsync(self) -> None:
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        self.on_handle(f"fsync {h}", h, os.fsync)
        return None

    def op_fattr(self) -> None:
        """fchmod / fsetxattr / fgetxattr through a descriptor (the name may be gone)."""
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        r = self.rng.random()
        if r < 0.4:
            mode = self.rng.choice((0o600, 0o644, 0o755, 0o000))
            self.on_handle(f"fchmod {h} {oct(mode)}", h, lambda fd: os.fchmod(fd, mode))
        elif r < 0.8:
            name = self.rng.choice(XATTR_NAMES)
            value = self.rng.randbytes(self.rng.randrange(64))
            self.on_handle(
                f"fsetxattr {h} {name}={show(value)}", h, lambda fd: os.setxattr(fd, name, value)
            )
        else:
            name = self.rng.choice(XATTR_NAMES)
            self.on_handle(f"fgetxattr {h} {name}", h, lambda fd: os.getxattr(fd, name))
        return None

    def op_drop_cache(self) -> None:
        """Write back and evict the file's page cache, so the next reads come from the daemon."""
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        self.on_handle(
            f"fadvise {h} DONTNEED",
            h,
            lambda fd: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED),
        )
        return None

    def op_unlink_open(self) -> None:
        """Unlink (or rename over) the name of an open file, which stays usable."""
        h = self.pick_handle()
        if h is None:
            return self.op_open()
        path = h.path
        if self.rng.random() < 0.3:
            src = self.pick_file()
            self.on_paths(
                f"rename {src} -> {path}",
                lambda root: os.rename(root / src, root / path),
                [src, path, parent_of(src), parent_of(path)],
            )
        else:
            self.on_paths(
                f"unlink {path}", lambda root: os.unlink(root / path), [path, parent_of(path)]
            )
        self.compare_handle(h)
        return None

    # -- the run -----------------------------------------------------------------------
    def close_all(self) -> None:
        for hid in sorted(self.handles):
            h = self.handles.pop(hid)
            ref = attempt(partial(os.close, h.ref_fd))
            got = attempt(partial(os.close, h.mnt_fd))
            self.expect_same(f"close {h}", ref, got)

    def close_quietly(self) -> None:
        for h in self.handles.values():
            for fd in (h.ref_fd, h.mnt_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.handles.clear()

    def remount(self) -> None:
        self.close_all()
        self.compare_trees("before unmounting")
        self.history.append(f"#{self.step} umount + mount")
        self.mount.umount()
        self.mount.start()
        self.compare_trees("after unmount + remount")

    def run(self) -> None:
        funcs = [f for f, _ in self.ops]
        weights = [w for _, w in self.ops]
        for step in range(self.steps):
            self.step = step
            if self.step == self.steps // 2:
                self.remount()
            self.rng.choices(funcs, weights)[0]()
            if self.step % TREE_EVERY == TREE_EVERY - 1:
                self.compare_trees(f"after step {self.step}")
        self.close_all()
        self.compare_trees("at the end, all files closed")


def test_mount_behaves_like_a_local_directory(tmp_path: Path) -> None:
    seed_env = os.environ.get("VAULTSYNC_MODEL_SEED")
    seed = int(seed_env) if seed_env else random.SystemRandom().randrange(1 << 32)
    steps = int(os.environ.get("VAULTSYNC_MODEL_STEPS") or DEFAULT_STEPS)
    chunk_env = os.environ.get("VAULTSYNC_MODEL_CHUNK")
    block = int(chunk_env) if chunk_env else random.Random(seed + 1).choice(CHUNK_SIZES)
    print(f"VAULTSYNC_MODEL_SEED={seed} VAULTSYNC_MODEL_STEPS={steps} (chunk size {block})")
    ref = tmp_path / "ref"
    ref.mkdir()
    mount = Mount.create(tmp_path / "vol", f"chunk_size = {block}\n")
    model = Model(mount, ref, seed, steps, block)
    t0 = time.monotonic()
    try:
        mount.start()
        model.run()
    finally:
        model.close_quietly()
        mount.cleanup()
    print(f"{steps} steps in {time.monotonic() - t0:.1f}s; ok {dict(model.ok_counts)}")
    print(f"errors {dict(model.err_counts)}")
    if steps >= 500:  # the run must have exercised the interesting paths, not just errnos
        for kind in ("open", "pwrite", "pread", "rename", "link", "symlink", "mkdir", "unlink"):
            assert model.ok_counts[kind] >= 3, (kind, dict(model.ok_counts))


def test_open_directory_outlives_rmdir(mounted: Mount) -> None:
    """Found by the model: rmdir used to drop a directory still open (fstat gave ENOENT)."""
    d = mounted.mountpoint / "d"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d)
        st = os.fstat(fd)
        assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 0
        assert os.listdir(fd) == []
    finally:
        os.close(fd)
