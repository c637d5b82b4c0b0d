"""Crash drill through the mount: kill -9 the daemon while a writer is busy, remount, check.

A writer process (this module run as a program) rewrites a handful of files under the
mount forever, in place (O_TRUNC) or through a temporary name and a rename, and fsyncs
some versions. Before touching a name it prints what it is about to do; after an
fsync (and, for a rename, the directory's fsync) returned it prints an `ack` line.
Contents are derived from (name, round, version), so the checker can recompute every
version the writer ever wrote.

The test SIGKILLs the mount daemon at a random moment after the writer's first ack,
remounts, and holds the writer to its acks: a file whose fsync was acknowledged must
hold exactly that version or a later one, and a later one may only be cut short (a
prefix), never a mix of versions or bytes nobody wrote. Every name in the tree must
stat and read cleanly (no dangling entry), and only names the writer used may appear.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.mounting import Mount
from vaultsync.engine.volume import read_local_header
from vaultsync.format.state_layout import StateDir
from vaultsync.format.txn import ROOT_INO

ROOT = Path(__file__).resolve().parents[2]
KIB = 1024
MIB = 1024 * KIB
NAMES = ("f0", "f1", "f2", "f3", "f4", "d/g0", "d/g1", "d/g2")
ROUNDS = int(os.environ.get("VAULTSYNC_CRASH_ROUNDS") or 3)


def _version(key: str, rnd: int, n: int) -> tuple[random.Random, int]:
    rng = random.Random(f"{key}:{rnd}:{n}")
    r = rng.random()
    if r < 0.05:
        size = 0
    elif r < 0.5:
        size = rng.randint(1, 20 * KIB)
    elif r < 0.75:
        size = rng.choice((64, 128, 256)) * KIB + rng.randint(-2, 2)  # block boundaries
    elif r < 0.95:
        size = rng.randint(20 * KIB, 400 * KIB)
    else:
        size = rng.randint(MIB - 5 * KIB, MIB + 70 * KIB)
    return rng, size


def content(key: str, rnd: int, n: int) -> bytes:
    """Version n (of round rnd) of the file `key`: its length and bytes, deterministically."""
    rng, size = _version(key, rnd, n)
    return rng.randbytes(size)


def size_of(key: str, rnd: int, n: int) -> int:
    return _version(key, rnd, n)[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the writer (runs as `python -m tests.mount.test_mount_crash MOUNTPOINT ROUND SEED`) -----------
def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def writer(mountpoint: Path, rnd: int, seed: int) -> None:
    """Write until the mount dies. Everything goes through directory descriptors opened
    on the mount, so once the daemon is killed (and the dead mount detached) nothing can
    land in the directory underneath: every call fails with ENOTCONN instead."""
    rng = random.Random(seed)
    root = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    if os.fstat(root).st_dev == os.stat(mountpoint.parent).st_dev:
        raise SystemExit(f"{mountpoint} is not a mount")
    with contextlib.suppress(FileExistsError):
        os.mkdir("d", dir_fd=root)
    sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=root)

    def where(name: str) -> tuple[int, str]:
        return (sub, name[2:]) if name.startswith("d/") else (root, name)

    def write_file(name: str, data: bytes, sync: bool) -> None:
        dfd, base = where(name)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dfd)
        try:
            pos = 0
            while pos < len(data):  # in uneven pieces, as applications do
                step = rng.choice((1000, 4096, 65536, 200_000, len(data)))
                pos += os.write(fd, data[pos : pos + step])
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def close_while_fsyncing(name: str, data: bytes) -> None:
        """One thread closes the descriptor it wrote through while another fsyncs a
        second descriptor of the same file: the fsync must still cover every write."""
        dfd, base = where(name)
        fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dfd)
        other = os.open(base, os.O_RDONLY, dir_fd=dfd)
        try:
            pos = 0
            while pos < len(data):
                pos += os.write(fd, data[pos:])
            failed: list[OSError] = []

            def close() -> None:
                try:
                    os.close(fd)
                except OSError as e:
                    failed.append(e)

            closer = threading.Thread(target=close)
            closer.start()
            try:
                os.fsync(other)
            finally:
                closer.join()
            if failed:
                raise failed[0]
        finally:
            os.close(other)

    n = 0
    try:
        while True:
            n += 1
            name = rng.choice(NAMES)
            data = content(name, rnd, n)
            sync = rng.random() < 0.5
            r = rng.random()
            if r < 0.15:
                say(f"write {name} {name} {rnd} {n}")
                close_while_fsyncing(name, data)
                say(f"ack {name} {name} {rnd} {n} {sha(data)}")
            elif r < 0.2:  # quiet now and then: an application thinking, the timers running
                time.sleep(rng.uniform(0.1, 1.0))
            elif r < 0.26:
                say(f"unlink {name}")
                dfd, base = where(name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(base, dir_fd=dfd)
            elif r < 0.42:  # the atomic-replace idiom: temp file, fsync, rename, fsync dir
                tmp = name + ".tmp"
                say(f"write {tmp} {name} {rnd} {n}")
                write_file(tmp, data, True)
                say(f"rename {tmp} {name}")
                (sdfd, sbase), (ddfd, dbase) = where(tmp), where(name)
                os.rename(sbase, dbase, src_dir_fd=sdfd, dst_dir_fd=ddfd)
                if sync:
                    os.fsync(ddfd)
                    say(f"ack {name} {name} {rnd} {n} {sha(data)}")
            else:
                say(f"write {name} {name} {rnd} {n}")
                write_file(name, data, sync)
                if sync:
                    say(f"ack {name} {name} {rnd} {n} {sha(data)}")
    except OSError as e:  # the daemon died under us: expected, and the end of this writer
        say(f"died {errno.errorcode.get(e.errno or 0, e.errno)}")


# -- the checker ---------------------------------------------------------------------------
Version = tuple[str, int, int]  # (content key, round, n)


@dataclass
class NameState:
    """What the writer's log says about one name, in the order things happened."""

    # (seq, version, may be cut short): written in place, or renamed in after its fsync
    arrivals: list[tuple[int, Version, bool]] = field(default_factory=list)
    acked: tuple[int, Version] | None = None  # the last acknowledged version
    absent_ok: bool = True  # never acked, or unlinked/renamed away since the last ack


@dataclass
class Ledger:
    names: dict[str, NameState] = field(default_factory=dict)
    seq: int = 0
    acks: int = 0

    def state(self, name: str) -> NameState:
        return self.names.setdefault(name, NameState())

    def feed(self, lines: list[str]) -> None:
        for line in lines:
            self.seq += 1
            parts = line.split()
            kind = parts[0] if parts else ""
            if kind == "write":
                name, key, rnd, n = parts[1], parts[2], int(parts[3]), int(parts[4])
                self.state(name).arrivals.append((self.seq, (key, rnd, n), True))
            elif kind == "rename":
                src, dst = self.state(parts[1]), self.state(parts[2])
                # The file carries what src last received, whole: it was fsynced before.
                if src.arrivals:
                    dst.arrivals.append((self.seq, src.arrivals[-1][1], False))
                src.absent_ok = True
            elif kind == "unlink":
                self.state(parts[1]).absent_ok = True
            elif kind == "ack":
                name, key, rnd, n, digest = (
                    parts[1],
                    parts[2],
                    int(parts[3]),
                    int(parts[4]),
                    parts[5],
                )
                assert sha(content(key, rnd, n)) == digest, f"writer/checker disagree: {line}"
                st = self.state(name)
                st.acked = (self.seq, (key, rnd, n))
                st.absent_ok = False
                self.acks += 1
            elif kind != "died":
                raise AssertionError(f"unexpected writer output: {line!r}")


def check_name(name: str, st: NameState, data: bytes | None) -> str | None:
    """None if what the mount holds under `name` is allowed by the ledger, else why not.

    Allowed: the last acknowledged version whole, or any version that arrived after it,
    whole or (if written in place) cut short; absence only if the name was never
    acknowledged or was unlinked or renamed away since.
    """
    if data is None:
        return None if st.absent_ok else f"acknowledged version {st.acked} is gone"
    after = st.acked[0] if st.acked else 0
    full = [v for s, v, _ in st.arrivals if s > after]
    cut = [v for s, v, c in st.arrivals if s > after and c]
    if st.acked:
        full.append(st.acked[1])
    for v in full:
        if size_of(*v) == len(data) and content(*v) == data:
            return None
    for v in cut:
        if size_of(*v) > len(data) and content(*v).startswith(data):
            return None
    # Explain: an older version, a prefix of the acked one, or bytes nobody wrote?
    for _, v, _ in reversed(st.arrivals):
        whole = content(*v)
        if whole == data:
            return f"holds {v}, older than the acknowledged {st.acked}"
        if whole.startswith(data):
            return f"holds a {len(data)}-byte prefix of {v} (acknowledged: {st.acked})"
    best = ""
    if st.arrivals:
        v = st.arrivals[-1][1]
        whole = content(*v)
        common = next(
            (i for i in range(min(len(whole), len(data))) if whole[i] != data[i]),
            min(len(whole), len(data)),
        )
        best = f"; vs the last version {v} ({len(whole)} bytes) it differs from offset {common}"
    return f"holds {len(data)} bytes matching no version the writer wrote{best}"


def read_tree(mountpoint: Path) -> tuple[dict[str, bytes], list[str], list[str]]:
    """Every file under the mount, every name, and every entry that misbehaves."""
    files: dict[str, bytes] = {}
    problems: list[str] = []
    seen: list[str] = []

    def walk(rel: str) -> None:
        d = mountpoint / rel if rel else mountpoint
        names = os.listdir(d)
        if len(names) != len(set(names)):
            problems.append(f"{rel or '<root>'}: duplicate names {sorted(names)}")
        for name in sorted(names):
            r = f"{rel}/{name}" if rel else name
            seen.append(r)
            try:
                st = os.lstat(mountpoint / r)
            except OSError as e:
                problems.append(f"{r}: listed but lstat fails: {e}")
                continue
            if stat.S_ISDIR(st.st_mode):
                walk(r)
            elif stat.S_ISREG(st.st_mode):
                try:
                    data = (mountpoint / r).read_bytes()
                except OSError as e:
                    problems.append(f"{r}: cannot be read: {e}")
                    continue
                if len(data) != st.st_size:
                    problems.append(f"{r}: size {st.st_size} but {len(data)} bytes read")
                if st.st_nlink != 1:
                    problems.append(f"{r}: nlink {st.st_nlink}, expected 1")
                files[r] = data
            else:
                problems.append(f"{r}: unexpected type {stat.filemode(st.st_mode)}")

    walk("")
    return files, seen, problems


def catalog_problems(state_dir: Path) -> list[str]:
    """fsck of the catalog (read-only, beside the running daemon): no orphan, no dangling
    entry, link counts that add up, no block beyond a file's end or without its chunk."""
    chunk_size = read_local_header(state_dir).chunk_size
    uri = f"file:{StateDir(state_dir).catalog}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        q = db.execute
        out = [
            f"dirent {p}/{n!r} -> missing inode {i}"
            for p, n, i in q(
                "SELECT parent, name, ino FROM dirents WHERE ino NOT IN (SELECT ino FROM inodes)"
            )
        ]
        out += [
            f"dirent {n!r} in missing or non-directory parent {p}"
            for p, n, m in q(
                "SELECT d.parent, d.name, i.mode FROM dirents d "
                "LEFT JOIN inodes i ON i.ino = d.parent"
            )
            if m is None or not stat.S_ISDIR(m)
        ]
        names = dict(q("SELECT ino, count(*) FROM dirents GROUP BY ino").fetchall())
        subdirs = dict(
            q(
                "SELECT d.parent, count(*) FROM dirents d JOIN inodes i ON i.ino = d.ino "
                "WHERE (i.mode & 61440) = 16384 GROUP BY d.parent"
            ).fetchall()
        )
        inodes = {
            ino: (mode, size, nlink)
            for ino, mode, size, nlink in q("SELECT ino, mode, size, nlink FROM inodes")
        }
        for ino, (mode, _size, nlink) in sorted(inodes.items()):
            if ino == ROOT_INO:
                continue
            if stat.S_ISDIR(mode):
                want = 2 + subdirs.get(ino, 0)
                if names.get(ino, 0) != 1:
                    out.append(f"directory {ino} has {names.get(ino, 0)} names")
            else:
                want = names.get(ino, 0)
            if not names.get(ino):
                out.append(f"orphan inode {ino} (nlink {nlink}): no name reaches it")
            elif nlink != want:
                out.append(f"inode {ino}: nlink {nlink}, but {want} by the directory entries")
        for ino, blockno, length, known in q(
            "SELECT b.ino, b.blockno, b.length, c.id IS NOT NULL FROM blocks b "
            "LEFT JOIN chunks c ON c.id = b.chunk"
        ):
            if ino not in inodes:
                out.append(f"block {blockno} of missing inode {ino}")
                continue
            if not known:
                out.append(f"inode {ino} block {blockno}: its chunk is not in the chunk index")
            if blockno * chunk_size + length > max(inodes[ino][1], 0) and length:
                out.append(
                    f"inode {ino} block {blockno} ({length} bytes) lies past its size "
                    f"{inodes[ino][1]}"
                )
        out += [
            f"xattr {n!r} of missing inode {i}"
            for i, n in q("SELECT ino, name FROM xattrs WHERE ino NOT IN (SELECT ino FROM inodes)")
        ]
        return out
    finally:
        db.close()


class Reader(threading.Thread):
    """Collects the writer's stdout lines as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.lines: list[str] = []
        self.first_ack = threading.Event()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not line.endswith("\n"):
                break  # a torn last line: the writer never finished saying it
            self.lines.append(line.rstrip("\n"))
            if line.startswith("ack "):
                self.first_ack.set()


def test_fsynced_files_survive_kill9_of_the_daemon(mounted: Mount) -> None:
    seed_env = os.environ.get("VAULTSYNC_CRASH_SEED")
    seed = int(seed_env) if seed_env else random.SystemRandom().randrange(1 << 32)
    print(f"VAULTSYNC_CRASH_SEED={seed}")
    rng = random.Random(seed)
    ledger = Ledger()
    known = {*NAMES, *(n + ".tmp" for n in NAMES), "d"}
    for rnd in range(ROUNDS):
        where = f"round {rnd} (VAULTSYNC_CRASH_SEED={seed})"
        err_path = mounted.root / f"writer{rnd}.err"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.mount.test_mount_crash",
                    str(mounted.mountpoint),
                    str(rnd),
                    str(rng.randrange(1 << 30)),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        reader = Reader(proc)
        reader.start()
        try:
            if not reader.first_ack.wait(60):
                raise AssertionError(
                    f"{where}: the writer never acknowledged an fsync: {err_path.read_text()}"
                )
            time.sleep(rng.uniform(0.2, 2.5))
            if proc.poll() is not None:
                raise AssertionError(
                    f"{where}: the writer stopped before the crash: {reader.lines[-1:]} "
                    f"{err_path.read_text()[-2000:]}"
                )
            mounted.kill9()
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        reader.join(30)
        lines = reader.lines
        last = lines[-1] if lines else ""
        assert last.split()[:1] == ["died"], (
            f"{where}: the writer did not die of the crash: last line {last!r}, "
            f"stderr {err_path.read_text()[-2000:]}"
        )
        assert last.split()[1] in {"ENOTCONN", "ECONNABORTED", "EIO"}, f"{where}: {last}"
        # With the dead mount detached, the directory underneath must be untouched.
        assert os.listdir(mounted.mountpoint) == [], f"{where}: writes leaked under the mount"
        ledger.feed(lines)

        mounted.start()
        files, names, problems = read_tree(mounted.mountpoint)
        assert not problems, f"{where}: after kill -9 and remount:\n" + "\n".join(problems)
        unknown = sorted(set(names) - known)
        assert not unknown, f"{where}: names the writer never used: {unknown}"
        failures = [
            f"{name}: {why}"
            for name, st in sorted(ledger.names.items())
            if (why := check_name(name, st, files.get(name)))
        ]
        failures += [f"{n}: exists but was never written" for n in files if n not in ledger.names]
        assert not failures, (
            f"{where}: after kill -9 and remount ({len(lines)} writer lines this round, "
            f"{ledger.acks} acks so far):\n" + "\n".join(failures)
        )
        bad = catalog_problems(mounted.state_dir)
        assert not bad, f"{where}: the catalog after remount:\n" + "\n".join(bad[:30])
        log = mounted.log.read_text(errors="replace")
        assert "Traceback" not in log, f"{where}: the daemon logged an error:\n{log[-3000:]}"
        print(f"round {rnd}: {len(lines)} writer lines, {len(files)} files checked")
    assert ledger.acks >= 3 * ROUNDS, f"too few acknowledged fsyncs to prove much: {ledger.acks}"


if __name__ == "__main__":
    writer(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
