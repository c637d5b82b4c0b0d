"""Recovery time and restore throughput from one target, with no local state at the site.

    .venv/bin/python benchmarks/recovery_bench.py [--files 10000,100000] [--restore-mib 1024]
        [--restore-file-mib 16] [--no-drop-caches] [--populate-limit 900] [--dir /tmp] [--keep]

Needs root (or /dev/fuse and fusermount3) and the `weed` binary. One SeaweedFS
is started on loopback for the whole run; every volume gets a bucket of its own,
is written by a real mount daemon at "site A" (tests/mounting.py, the product's
default volume and replication settings) and is then recovered at "site B": a
config holding only the target (its state_dir is never created), as the
disaster-recovery operator has it. In order:

1. Recovery time, for each N of --files: N files of 1-4 KiB (random sizes,
   incompressible, no two alike) spread over 100 directories are written
   through the mount without fsync (one fsync at the end), then `vaultsync
   umount` ships everything. Population time and rate are printed (a large N
   can take minutes; --files chooses). Then, with the page cache dropped, the
   clock runs from spawning `vaultsync mount CONFIG MNT --from sw` until
   reading the first byte of a known file (the last one written) succeeds;
   the moment the mount appeared and the daemon's own "rebuilt ... in Xs" are
   recorded too. Checked afterwards, untimed: that file's whole content and
   the entry count of its directory.
2. Restore throughput: a tree of --restore-mib MiB in files of
   --restore-file-mib MiB (random, so nothing compresses or deduplicates) is
   written to a local directory and, identically, through a mount, which is
   then unmounted. With the page cache dropped, `vaultsync restore CONFIG
   /tree DEST --from sw` is timed from spawn to exit (MB/s, 1 MB = 10^6
   bytes), then, again cold, `cp -a` of the local tree to another local
   directory on the same disk, for reference. The restored tree is compared
   with the local one byte for byte afterwards.

Prints measure, figure, target and result; exits with status 1 if a target is
missed or a phase failed (the other phases still run). Mounts, daemons,
SeaweedFS and temp files are cleaned up (by PID) on exit, error, Ctrl-C or
SIGTERM; --keep leaves the temp dir (daemon logs) for inspection.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import functools
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.mounting when run as a script

from benchmarks.harness import Row, RunFrame, SeaweedBench, write_all  # noqa: E402
from tests.support.mounting import Mount  # noqa: E402
from vaultsync.config import TargetConfig  # noqa: E402
from vaultsync.fuse.mount import lazy_unmount, mounted_at  # noqa: E402

MIB = 1 << 20
TARGET_NAME = "sw"
DIRS = 100
MIN_FILE, MAX_FILE = 1024, 4096
POLL = 0.005  # seconds between first-byte attempts
UMOUNT_TIMEOUT = 900.0
# Targets (the brief's numbers): recovery seconds by file count, restore MB/s.
RECOVERY_TARGETS = {10_000: 5.0, 100_000: 15.0}
RESTORE_MBS = 100.0


# -- small helpers -----------------------------------------------------------------------


def drop_caches(enabled: bool) -> str:
    """Flush dirty pages and drop the page cache; how it went, for the report."""
    os.sync()
    if not enabled:
        return "page cache kept (--no-drop-caches)"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "page cache dropped"
    except OSError as e:
        return f"page cache NOT dropped ({e.strerror})"


def recovery_target(n: int) -> float | None:
    """Seconds allowed for N files: the brief's figures, interpolated linearly in between."""
    if n in RECOVERY_TARGETS:
        return RECOVERY_TARGETS[n]
    pts = sorted(RECOVERY_TARGETS.items())
    for (n0, t0), (n1, t1) in itertools.pairwise(pts):
        if n0 < n < n1:
            return t0 + (t1 - t0) * (n - n0) / (n1 - n0)
    return None  # outside the brief's range: information only


def vaultsync_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaultsync", *args]


def parse_files(text: str) -> list[int]:
    try:
        out = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of file counts: {text!r}") from None
    if not out or any(n < 1 for n in out):
        raise argparse.ArgumentTypeError("file counts must be >= 1")
    return out


class SmallFiles:
    """The population of one volume: path, size and content of file i, reproducibly."""

    def __init__(self, n: int, seed: int) -> None:
        rng = random.Random(seed)
        self.n = n
        self.pool = os.urandom(4 * MIB)
        self.sizes = [rng.randint(MIN_FILE, MAX_FILE) for _ in range(n)]
        self.offsets = [rng.randrange(0, len(self.pool) - MAX_FILE) for _ in range(n)]

    @staticmethod
    def rel(i: int) -> str:
        return f"d{i % DIRS:03d}/f{i:07d}"

    def content(self, i: int) -> bytes:
        # An 8-byte index first: no two files alike, so nothing deduplicates.
        size, off = self.sizes[i], self.offsets[i]
        return i.to_bytes(8, "little") + self.pool[off : off + size - 8]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)


# -- results -----------------------------------------------------------------------------


@dataclass
class Recovery:
    first_byte: float  # spawn -> first byte read
    mounted: float | None  # spawn -> mount visible in mountinfo
    rebuilt_log: float | None  # the daemon's own rebuild time, from its log
    checkpoint: int | None  # LSN of the checkpoint the rebuild started from
    lsn: int | None
    attempts: int


# -- the run -------------------------------------------------------------------------------
class Bench(SeaweedBench):
    TARGET_NAME = TARGET_NAME

    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        super().__init__(args, base)
        self.procs: list[tuple[subprocess.Popen[bytes], Path | None]] = []  # (proc, mountpoint)

    def target(self, mode: str = "async", bucket_prefix: str = "rc-") -> TargetConfig:
        return super().target(mode, bucket_prefix)

    def site_b_config(self, name: str, t: TargetConfig) -> Path:
        """Site B: a config with only the target; its state_dir is never created."""
        root = self.base / name
        root.mkdir()
        cfg = root / "vs.toml"
        cfg.write_text('[volume]\nname = "t"\nstate_dir = "unused"\n' + self.targets_toml(t))
        return cfg

    def segment_objects(self, t: TargetConfig) -> tuple[int, int]:
        """(count, bytes) of the segment objects at the target."""
        assert self.provider is not None
        c = self.provider.client()
        n = size = 0
        try:
            for page in c.get_paginator("list_objects_v2").paginate(
                Bucket=t.bucket, Prefix=f"{t.prefix}segments/"
            ):
                for o in page.get("Contents", []):
                    n += 1
                    size += int(o["Size"])
        finally:
            c.close()
        return n, size

    def umount(self, m: Mount) -> float:
        """`vaultsync umount` (flushes and ships everything); seconds it took."""
        t0 = time.perf_counter()
        res = subprocess.run(
            vaultsync_cmd("umount", str(m.mountpoint)),
            capture_output=True,
            text=True,
            timeout=UMOUNT_TIMEOUT,
        )
        if res.returncode != 0:
            raise RuntimeError(f"umount failed: {res.stderr.strip()[-500:]}")
        if m.proc is not None:
            m.proc.wait(60)
            m.proc = None
        return time.perf_counter() - t0

    def spawn(self, args: list[str], log: Path, mountpoint: Path | None) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            p = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env={**os.environ, "COLUMNS": "250"},  # rich: one line per message
            )
        self.procs.append((p, mountpoint))
        return p

    def stop_proc(self, p: subprocess.Popen[bytes], mountpoint: Path | None) -> None:
        """Unmount (a point mount exits then), else SIGTERM, then SIGKILL: by PID only."""
        if mountpoint is not None and p.poll() is None and mounted_at(mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, timeout=30)
        for sig, wait in ((None, 30.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if p.poll() is not None:
                break
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(wait)
        if mountpoint is not None and mounted_at(mountpoint) is not None:
            lazy_unmount(mountpoint)

    def teardown(self) -> None:
        for p, mp in self.procs:
            try:
                self.stop_proc(p, mp)
            except Exception as e:
                print(f"cleanup of pid {p.pid} failed: {e}", file=sys.stderr)
        super().teardown()

    # phase 1: recovery time
    def populate(self, m: Mount, files: SmallFiles) -> tuple[float, float]:
        """Write every file without fsync, then one fsync; (write seconds, fsync seconds)."""
        mnt = m.mountpoint
        for d in range(min(DIRS, files.n)):
            (mnt / f"d{d:03d}").mkdir()
        limit = self.args.populate_limit
        step = max(1, files.n // 10)
        t0 = time.perf_counter()
        for i in range(files.n):
            fd = os.open(mnt / files.rel(i), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                write_all(fd, files.content(i))
            finally:
                os.close(fd)
            if (i + 1) % step == 0 or i + 1 == files.n:
                dt = time.perf_counter() - t0
                rate = (i + 1) / dt
                eta = (files.n - i - 1) / rate
                print(
                    f"    {i + 1:,}/{files.n:,} files in {dt:.0f}s ({rate:,.0f} files/s, "
                    f"{eta:.0f}s to go)",
                    flush=True,
                )
                if dt + eta > limit:
                    raise RuntimeError(
                        f"populating {files.n:,} files would take ~{dt + eta:.0f}s at "
                        f"{rate:,.0f} files/s, over --populate-limit {limit:.0f}s; "
                        "choose a smaller --files"
                    )
        wrote = time.perf_counter() - t0
        t1 = time.perf_counter()
        fd = os.open(mnt / files.rel(files.n - 1), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return wrote, time.perf_counter() - t1

    def time_first_byte(
        self, cfg: Path, mp: Path, rel: str, expect: int, log: Path
    ) -> tuple[Recovery, subprocess.Popen[bytes]]:
        known = mp / rel
        timeout = self.args.recovery_timeout
        t0 = time.perf_counter()
        p = self.spawn(vaultsync_cmd("mount", str(cfg), str(mp), "--from", TARGET_NAME), log, mp)
        mounted: float | None = None
        attempts = 0
        while True:
            now = time.perf_counter()
            if mounted is None and mounted_at(mp) is not None:
                mounted = now - t0
            attempts += 1
            try:
                fd = os.open(known, os.O_RDONLY)
            except FileNotFoundError:  # not mounted yet: the empty directory below
                pass
            else:
                try:
                    got = os.read(fd, 1)
                finally:
                    os.close(fd)
                first = time.perf_counter() - t0
                if got != bytes([expect]):
                    raise RuntimeError(f"first byte of {rel} is {got!r}, expected {expect:#04x}")
                break
            if p.poll() is not None:
                raise RuntimeError(
                    f"mount --from exited with {p.returncode}: "
                    + log.read_text(errors="replace")[-1500:]
                )
            if now - t0 > timeout:
                raise RuntimeError(f"no byte of {rel} within {timeout:.0f}s")
            time.sleep(POLL)
        text = log.read_text(errors="replace")
        rebuilt = re.search(r"\(LSN (\d+)\) in ([\d.]+)s(?:, from checkpoint (\d+))?", text)
        return (
            Recovery(
                first,
                mounted if mounted is not None else first,
                float(rebuilt.group(2)) if rebuilt else None,
                int(rebuilt.group(3)) if rebuilt and rebuilt.group(3) else None,
                int(rebuilt.group(1)) if rebuilt else None,
                attempts,
            ),
            p,
        )

    def recovery(self, n: int) -> None:
        files = SmallFiles(n, seed=n)
        t = self.target()
        a = Mount.create(self.base / f"a-{n}", self.targets_toml(t))
        self.mounts.append(a)
        a.start(timeout=120)
        print(
            f"    populating {n:,} files ({files.total_bytes / 1e6:.1f} MB) in {DIRS} dirs",
            flush=True,
        )
        t0 = time.perf_counter()
        wrote, fsynced = self.populate(a, files)
        took_umount = self.umount(a)
        total = time.perf_counter() - t0
        segs, seg_bytes = self.segment_objects(t)
        self.rows.append(
            Row(
                f"populate {n:,} files (write, fsync, umount)",
                f"{total:.1f} s ({n / total:,.0f} files/s)",
            )
        )
        self.notes.append(
            f"{n:,} files: {files.total_bytes:,} B written in {wrote:.1f}s "
            f"({n / wrote:,.0f} files/s, no fsync), final fsync {fsynced:.2f}s, umount "
            f"(ships everything) {took_umount:.1f}s; target holds {segs} segment objects, "
            f"{seg_bytes / 1e6:.1f} MB"
        )

        # Site B: no local state at all, only the target.
        cfg = self.site_b_config(f"b-{n}", t)
        mp = cfg.parent / "mnt"
        mp.mkdir()
        last = n - 1
        rel, content = files.rel(last), files.content(last)
        how = drop_caches(not self.args.no_drop_caches)
        rec, p = self.time_first_byte(cfg, mp, rel, content[0], cfg.parent / "point.log")
        try:
            # Untimed checks: the known file whole, and its directory complete.
            if (mp / rel).read_bytes() != content:
                raise RuntimeError(f"{rel} differs from what was written")
            listed = len(os.listdir(mp / rel.split("/")[0]))
            want = sum(1 for i in range(n) if i % DIRS == last % DIRS)
            if listed != want:
                raise RuntimeError(f"{rel.split('/')[0]} lists {listed} entries, want {want}")
        finally:
            self.stop_proc(p, mp)
        limit = recovery_target(n)
        self.rows.append(
            Row(
                f"recovery {n:,} files: mount --from -> first byte",
                f"{rec.first_byte:.2f} s",
                f"<= {limit:.1f} s" if limit is not None else "-",
                None if limit is None else rec.first_byte <= limit,
            )
        )
        rebuilt = f"{rec.rebuilt_log:.1f}s" if rec.rebuilt_log is not None else "?"
        ckpt = f"from checkpoint LSN {rec.checkpoint}" if rec.checkpoint else "no checkpoint"
        self.rows.append(
            Row(
                f"  of which: rebuild (daemon log, {ckpt})",
                rebuilt,
            )
        )
        self.notes.append(
            f"{n:,} files recovery ({how}): mount visible after {rec.mounted:.2f}s, first byte "
            f"at {rec.first_byte:.2f}s; daemon's rebuild {rebuilt} to LSN {rec.lsn}, {ckpt}; "
            f"{segs} segments ({seg_bytes / 1e6:.1f} MB) at the target"
        )

    # phase 2: restore throughput
    def restore(self) -> None:
        args = self.args
        count = max(1, args.restore_mib // args.restore_file_mib)
        fsize = args.restore_file_mib * MIB
        total = count * fsize
        local = self.base / "local-tree"
        local.mkdir()
        t = self.target()
        a = Mount.create(self.base / "a-restore", self.targets_toml(t))
        self.mounts.append(a)
        a.start(timeout=120)
        (a.mountpoint / "tree").mkdir()
        t0 = time.perf_counter()
        for k in range(count):
            name = f"f{k:03d}.bin"
            fds = [
                os.open(d / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                for d in (local, a.mountpoint / "tree")
            ]
            try:
                for _ in range(args.restore_file_mib):
                    block = os.urandom(MIB)
                    for fd in fds:
                        write_all(fd, block)
                os.fsync(fds[1])
            finally:
                for fd in fds:
                    os.close(fd)
        wrote = time.perf_counter() - t0
        took_umount = self.umount(a)
        segs, seg_bytes = self.segment_objects(t)
        self.notes.append(
            f"restore tree: {count} files x {args.restore_file_mib} MiB = {total:,} B written "
            f"(local copy + mount, fsync per file) in {wrote:.1f}s, umount {took_umount:.1f}s; "
            f"target holds {segs} segments, {seg_bytes / 1e6:.1f} MB"
        )

        cfg = self.site_b_config("b-restore", t)
        dest = cfg.parent / "restored"
        how = drop_caches(not args.no_drop_caches)
        log = cfg.parent / "restore.log"
        t0 = time.perf_counter()
        p = self.spawn(
            vaultsync_cmd("restore", str(cfg), "/tree", str(dest), "--from", TARGET_NAME),
            log,
            None,
        )
        try:
            rc = p.wait(args.recovery_timeout * 4)
        except subprocess.TimeoutExpired:
            limit = args.recovery_timeout * 4
            raise RuntimeError(f"restore did not finish within {limit:.0f}s") from None
        took = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"restore exited {rc}: {log.read_text(errors='replace')[-1500:]}")
        rate = total / 1e6 / took
        self.rows.append(
            Row(
                f"restore {total / MIB:,.0f} MiB tree ({count} x {args.restore_file_mib} MiB)",
                f"{rate:.1f} MB/s ({took:.1f} s)",
                f">= {RESTORE_MBS:.0f} MB/s",
                rate >= RESTORE_MBS,
            )
        )

        cp_dest = self.base / "cp-tree"
        drop_caches(not args.no_drop_caches)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", str(local), str(cp_dest)], check=True, timeout=1800)
        os.sync()  # cp leaves dirty pages behind; the restore's exit was not waited on either
        took_cp = time.perf_counter() - t0
        self.rows.append(
            Row(
                "cp -a of the same tree (local -> local, + sync)",
                f"{total / 1e6 / took_cp:.1f} MB/s ({took_cp:.1f} s)",
            )
        )
        self.rows.append(Row("restore / cp -a", f"{took / took_cp:.1f}x the time"))

        # Untimed: the restored tree is the local tree, byte for byte.
        names = sorted(os.listdir(dest))
        want = sorted(os.listdir(local))
        if names != want:
            raise RuntimeError(f"restored tree lists {len(names)} files, want {len(want)}")
        bad = [n for n in names if not filecmp.cmp(dest / n, local / n, shallow=False)]
        if bad:
            raise RuntimeError(f"{len(bad)} restored files differ, e.g. {bad[0]}")
        out = log.read_text(errors="replace").strip().splitlines()
        self.notes.append(
            f"restore ({how}): {took:.1f}s spawn to exit, verified byte for byte; "
            f"it said: {out[-1] if out else '(nothing)'}"
        )

    def startup_floor(self) -> None:
        """Seconds for `python -m vaultsync version`: the interpreter + CLI floor of each run."""
        t0 = time.perf_counter()
        subprocess.run(vaultsync_cmd("version"), capture_output=True, check=True, timeout=60)
        self.notes.append(
            f"`python -m vaultsync version` (warm): {time.perf_counter() - t0:.2f}s, "
            "the process-start floor inside every figure above"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--files",
        type=parse_files,
        default=[10_000, 100_000],
        help="comma-separated volume sizes in files (default 10000,100000)",
    )
    ap.add_argument("--restore-mib", type=int, default=1024, help="size of the restored tree")
    ap.add_argument("--restore-file-mib", type=int, default=16, help="size of each tree file")
    ap.add_argument("--no-restore", action="store_true", help="skip the restore phase")
    ap.add_argument(
        "--populate-limit",
        type=float,
        default=900,
        help="give up populating a volume projected to take longer (seconds)",
    )
    ap.add_argument(
        "--recovery-timeout", type=float, default=300, help="seconds to wait for the first byte"
    )
    ap.add_argument(
        "--no-drop-caches", action="store_true", help="keep the page cache before timed runs"
    )
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temp dir (one disk)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, state)")
    args = ap.parse_args()
    if args.restore_mib < 1 or args.restore_file_mib < 1:
        ap.error("--restore-mib and --restore-file-mib must be >= 1")

    frame = RunFrame.start("vs-recbench-", args.dir)
    bench = Bench(args, frame.base)

    def work() -> None:
        bench.attempt("starting SeaweedFS", bench.start_provider)
        if bench.provider is not None:
            for n in args.files:
                bench.attempt(f"recovery of {n:,} files", functools.partial(bench.recovery, n))
            if not args.no_restore:
                bench.attempt("restore throughput", bench.restore)
            bench.attempt("process start floor", bench.startup_floor)

    if not frame.guard(work, bench.teardown, keep=args.keep):
        return 130
    frame.summary(
        f"recovery_bench: --files {','.join(str(n) for n in args.files)} "
        f"--restore-mib {args.restore_mib} --restore-file-mib {args.restore_file_mib}"
    )
    return bench.report()


if __name__ == "__main__":
    sys.exit(main())
