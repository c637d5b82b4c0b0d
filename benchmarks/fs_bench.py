"""Filesystem workloads on a vaultsync mount against a plain local directory, in one run.

    .venv/bin/python benchmarks/fs_bench.py [--size-mib 1024] [--files 5000]
        [--iterations 2000] [--dir /tmp] [--keep-going]

Needs root (or at least /dev/fuse and fusermount3) and the `weed` binary: the
volume replicates asynchronously to a SeaweedFS started here on loopback, so the
shipper runs during the workloads as it would in production. Both directories
sit under one temporary directory, on the same disk.

All local workloads run first, then the same workloads on the mount (so the
mount's background shipping never disturbs the local reference):

- sequential write of --size-mib MiB in 1 MiB blocks, ending in fsync (MB/s);
  half the blocks are random, half text-like, and every 4 KiB is distinct, so
  neither compression nor deduplication flatters the result;
- cold sequential read of that file in 1 MiB blocks (MB/s): the page cache is
  dropped first (`echo 3 > /proc/sys/vm/drop_caches` after sync, falling back
  to posix_fadvise DONTNEED), and the mount is also unmounted and remounted;
- create + write 4 KiB + fsync + close of --files files (files/s);
- stat of those files (stats/s), after a pause longer than the mount's
  attribute/entry cache timeout, so every stat reaches the daemon;
- `ls -l` of their directory (entries/s: readdir and lstat of each), after
  the same pause; no target, a guard against listings that grow worse than
  linearly with the directory;
- rename of each file, then unlink of each (ops/s, renames + unlinks);
- an untar: --files files of mixed sizes (9 KiB on average) created, written
  and closed without fsync, in directories of 100 (files/s; no target);
- 4 KiB pwrite + fsync at random aligned offsets of a 16 MiB file,
  --iterations times: p50 and p99 latency (ms);
- peak resident memory of the mount daemon(s) over the whole run (VmHWM from
  /proc/PID/status, sampled, and the exact figure from wait4 at exit).

Prints a table of local figure, vaultsync figure, ratio (vaultsync / local) and
target; exits with status 1 if a target was missed or a workload failed. With
--keep-going a failing workload is reported in the table and the run goes on;
without it the run stops there. Everything (mounts, SeaweedFS, temp files) is
cleaned up on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.mounting when run as a script

from benchmarks.harness import RunFrame, print_grid, write_all  # noqa: E402
from tests.support.mounting import Mount  # noqa: E402
from vaultsync.commands.local_servers import LocalProvider, start_seaweedfs  # noqa: E402

MIB = 1 << 20
BLOCK = MIB
SMALL = 4096
LAT_FILE_SIZE = 16 * MIB
# A pause between the create and stat workloads, as on the local side. The mount's
# attribute timeout is long (fuse/operations.py), but each file's cached attributes
# were invalidated by its last write (writeback cache), so its stat is a GETATTR
# that reaches the daemon: the measured rate is the daemon's, not the kernel's.
STAT_PAUSE = 1.5
WORDS = (
    b"replica segment journal bucket provider chunk catalog volume fsync lease epoch "
    b"restore snapshot mount target quorum watermark sealed torn checksum"
).split()


# -- data ------------------------------------------------------------------------------
class BlockSource:
    """Distinct 1 MiB blocks, alternating incompressible and text-like (about 3:1).

    A small pool of base blocks is generated once; block i is pool[i % n] with
    a stamp (i, offset) at the start of every 4 KiB, so no two aligned pieces of
    4 KiB or more are alike: whatever the volume's chunk size, nothing
    deduplicates, at little generation cost inside the timed loops.
    """

    def __init__(self, pool: int = 16, seed: int = 7) -> None:
        rng = random.Random(seed)
        text = b" ".join(rng.choice(WORDS) for _ in range(BLOCK // 4))[:BLOCK]
        self.pool: list[bytes] = []
        for k in range(pool):
            if k % 2:
                self.pool.append(os.urandom(BLOCK))
            else:
                cut = rng.randrange(len(text))
                self.pool.append((text[cut:] + text[:cut])[:BLOCK])
        self.buf = bytearray(BLOCK)

    def block(self, i: int) -> bytearray:
        buf = self.buf
        buf[:] = self.pool[i % len(self.pool)]
        stamp = i.to_bytes(8, "little")
        for off in range(0, BLOCK, SMALL):
            buf[off : off + 16] = stamp + off.to_bytes(8, "little")
        return buf

    def expected(self, i: int) -> bytes:
        return bytes(self.block(i))


# -- cache control ---------------------------------------------------------------------
def drop_caches(files: list[Path]) -> str:
    """Flush dirty pages and drop the page cache; how it was done, for the report."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"


# -- workloads -------------------------------------------------------------------------
def seq_write(path: Path, blocks: int, src: BlockSource) -> float:
    """MB/s of writing `blocks` MiB and fsyncing them (open to close, less data generation)."""
    gen = 0.0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(blocks):
            g0 = time.perf_counter()
            buf = src.block(i)
            gen += time.perf_counter() - g0
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return blocks * BLOCK / 1e6 / (time.perf_counter() - t0 - gen)


def seq_read(path: Path, blocks: int, src: BlockSource) -> float:
    """MB/s of reading the whole file in 1 MiB reads; checks size and a few blocks after."""
    buf = bytearray(BLOCK)
    total = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            total += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    if total != blocks * BLOCK:
        raise RuntimeError(f"read {total} bytes from {path}, expected {blocks * BLOCK}")
    with open(path, "rb") as f:  # untimed spot check: a fast read of wrong data is no result
        for i in sorted({0, 1, blocks // 2, blocks - 1}):
            f.seek(i * BLOCK)
            if f.read(BLOCK) != src.expected(i):
                raise RuntimeError(f"block {i} of {path} does not hold what was written")
    return total / 1e6 / elapsed


def small_names(n: int) -> list[str]:
    return [f"f{i:06d}" for i in range(n)]


def create_small(d: Path, n: int) -> float:
    """files/s of create + write 4 KiB + fsync + close."""
    d.mkdir()
    payload = bytearray(os.urandom(SMALL))
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.perf_counter()
        for i, name in enumerate(small_names(n)):
            payload[:8] = i.to_bytes(8, "little")
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
        return n / (time.perf_counter() - t0)
    finally:
        os.close(dfd)


def extract_tree(d: Path, n: int) -> float:
    """files/s of an untar: create + write + close, no fsync, of n files of mixed sizes
    (mostly a few KiB, a few up to 1 MiB, 9 KiB on average) in directories of 100."""
    rng = random.Random(n)
    blob = os.urandom(2 << 20)
    sizes = [min(int(rng.lognormvariate(8, 1.5)), 1 << 20) for _ in range(n)]
    starts = [rng.randrange(0, (1 << 20) - 8) for _ in range(n)]
    d.mkdir()
    t0 = time.perf_counter()
    for i, (size, at) in enumerate(zip(sizes, starts, strict=True)):
        sub = d / f"d{i // 100:03d}"
        if i % 100 == 0:
            sub.mkdir()
        fd = os.open(sub / f"f{i}.c", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, memoryview(blob)[at : at + size])
        finally:
            os.close(fd)
    rate = n / (time.perf_counter() - t0)
    shutil.rmtree(d)
    return rate


def stat_small(d: Path, n: int) -> float:
    """stats/s over the files, after the kernel's cached attributes expired."""
    time.sleep(STAT_PAUSE)
    names = small_names(n)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.perf_counter()
        for name in names:
            st = os.stat(name, dir_fd=dfd)
            if st.st_size != SMALL:
                raise RuntimeError(f"{d / name} has size {st.st_size}, expected {SMALL}")
        return n / (time.perf_counter() - t0)
    finally:
        os.close(dfd)


def list_small(d: Path, n: int) -> float:
    """entries/s of `ls -l` of the directory (readdir + lstat of each), attributes expired."""
    time.sleep(STAT_PAUSE)
    t0 = time.perf_counter()
    seen = 0
    with os.scandir(d) as it:
        for entry in it:
            entry.stat(follow_symlinks=False)
            seen += 1
    rate = seen / (time.perf_counter() - t0)
    if seen != n:
        raise RuntimeError(f"{d} lists {seen} entries, expected {n}")
    return rate


def rename_delete(d: Path, n: int) -> float:
    """ops/s of renaming every file, then unlinking every file (2n ops)."""
    names = small_names(n)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        t0 = time.perf_counter()
        for name in names:
            os.rename(name, "r" + name, src_dir_fd=dfd, dst_dir_fd=dfd)
        for name in names:
            os.unlink("r" + name, dir_fd=dfd)
        rate = 2 * n / (time.perf_counter() - t0)
    finally:
        os.close(dfd)
    left = os.listdir(d)
    if left:
        raise RuntimeError(f"{len(left)} entries left in {d} after unlinking all")
    return rate


def pwrite_fsync(path: Path, iterations: int) -> tuple[float, float]:
    """p50 and p99 (ms) of one 4 KiB pwrite + fsync at a random aligned offset."""
    with open(path, "wb") as f:  # untimed: the file exists and is durable first
        for _ in range(LAT_FILE_SIZE // MIB):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
    rng = random.Random(11)
    payload = bytearray(os.urandom(SMALL))
    lat: list[float] = []
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in range(iterations):
            off = rng.randrange(LAT_FILE_SIZE // SMALL) * SMALL
            payload[:8] = i.to_bytes(8, "little")
            t0 = time.perf_counter()
            os.pwrite(fd, payload, off)
            os.fsync(fd)
            lat.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


# -- the mount daemon's memory -----------------------------------------------------------
def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakRss:
    """Samples VmHWM of the daemons we started, every 100 ms, in a thread."""

    def __init__(self) -> None:
        self.peak_kib: dict[int, int] = {}
        self._pids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        with self._lock:
            self._pids.add(pid)
        self.sample()

    def record(self, pid: int, kib: int) -> None:
        with self._lock:
            self._pids.discard(pid)
            self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), kib)

    def sample(self) -> None:
        with self._lock:
            for pid in list(self._pids):
                kib = vm_hwm_kib(pid)
                if kib is not None:
                    self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), kib)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    @property
    def peak_mib(self) -> float:
        with self._lock:
            return max(self.peak_kib.values(), default=0) / 1024


# -- vaultsync setup -------------------------------------------------------------------
@dataclass
class VaultsyncSide:
    base: Path
    rss: PeakRss
    provider: LocalProvider | None = None
    mount: Mount | None = None
    chunk_size: int = 0
    events: list[str] = field(default_factory=list)

    def setup(self) -> None:
        ak, sk = "VS" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)
        t0 = time.perf_counter()
        self.provider = start_seaweedfs(self.base / "seaweedfs", access_key=ak, secret_key=sk)
        bucket = "fsbench-" + secrets.token_hex(4)
        self.provider.create_bucket(bucket)
        cred = self.base / "sw.creds"
        fd = os.open(cred, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"access_key_id = {ak}\nsecret_access_key = {sk}\n")
        targets = (
            f'[[targets]]\nname = "sw"\nendpoint = "{self.provider.endpoint}"\n'
            f'bucket = "{bucket}"\nprefix = "vol/"\nmode = "async"\n'
            f'credentials = {{ file = "{cred}" }}\n'
        )
        self.mount = Mount.create(self.base / "vs", targets)
        header = json.loads((self.mount.state_dir / "volume.json").read_text())
        self.chunk_size = int(header["chunk_size"])
        self.events.append(
            f"SeaweedFS pid {self.provider.pid} at {self.provider.endpoint}, bucket {bucket}, "
            f"async target; ready in {time.perf_counter() - t0:.1f}s; "
            f"volume chunk size {self.chunk_size // 1024} KiB"
        )

    @property
    def mnt(self) -> Path:
        assert self.mount is not None
        return self.mount.mountpoint

    def start(self) -> None:
        assert self.mount is not None
        self.mount.start(timeout=120)
        assert self.mount.proc is not None
        self.rss.watch(self.mount.proc.pid)

    def stop(self) -> None:
        """`vaultsync umount`, then reap the daemon with wait4 for its exact peak RSS."""
        m = self.mount
        assert m is not None and m.proc is not None
        proc = m.proc
        self.rss.sample()
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "vaultsync", "umount", str(m.mountpoint)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if res.returncode != 0:
            raise RuntimeError(f"vaultsync umount failed: {res.stderr.strip()[-500:]}")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        m.proc = None
        self.rss.record(proc.pid, usage.ru_maxrss)
        self.events.append(
            f"daemon pid {proc.pid}: exit {proc.returncode}, peak RSS "
            f"{usage.ru_maxrss / 1024:.0f} MiB, umount took {time.perf_counter() - t0:.1f}s"
        )

    def teardown(self) -> None:
        if self.mount is not None:
            try:
                if self.mount.proc is not None and self.mount.proc.poll() is None:
                    self.stop()
            except Exception as e:
                print(f"clean unmount failed ({e}); killing the daemon", file=sys.stderr)
            finally:
                self.mount.cleanup()  # kill -9 + lazy unmount if anything is left
        if self.provider is not None:
            self.provider.stop(grace=10)


# -- results ---------------------------------------------------------------------------
@dataclass
class Row:
    name: str
    unit: str
    target: str
    local: float | None = None
    vs: float | None = None
    ok: Callable[[float | None, float | None], bool] | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.local is None or self.vs is None or self.local == 0:
            return None
        return self.vs / self.local

    @property
    def verdict(self) -> str:
        if self.error is not None:
            return "ERROR"
        if self.ok is None or self.vs is None:
            return "-"
        return "PASS" if self.ok(self.local, self.vs) else "FAIL"


def fmt(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def print_table(rows: list[Row]) -> None:
    head = ["workload", "local", "vaultsync", "ratio", "target", "result"]
    body = [
        [
            f"{r.name} ({r.unit})",
            fmt(r.local),
            fmt(r.vs),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target,
            r.verdict,
        ]
        for r in rows
    ]
    print_grid(head, body, {0, 4, 5})
    for r in rows:
        if r.error:
            print(f"  {r.name}: {r.error}")


# -- the run ---------------------------------------------------------------------------


def run(args: argparse.Namespace, base: Path, rss: PeakRss, vs: VaultsyncSide) -> list[Row]:
    blocks, n, iters = args.size_mib, args.files, args.iterations
    src = BlockSource()
    rows = {
        "write": Row(
            f"seq write {blocks} MiB + fsync",
            "MB/s",
            ">= 0.5x local",
            ok=lambda lo, v: lo is not None and v is not None and v >= 0.5 * lo,
        ),
        "read": Row(
            f"cold seq read {blocks} MiB",
            "MB/s",
            ">= 0.3x local",
            ok=lambda lo, v: lo is not None and v is not None and v >= 0.3 * lo,
        ),
        "create": Row(
            f"create+4K+fsync+close x{n}",
            "files/s",
            ">= 3000/s",
            ok=lambda lo, v: v is not None and v >= 3000,
        ),
        "stat": Row(
            f"stat x{n}", "stats/s", ">= 20000/s", ok=lambda lo, v: v is not None and v >= 20000
        ),
        "list": Row(f"ls -l of {n} entries", "entries/s", "-"),
        "rename": Row(
            f"rename+unlink x{n}",
            "ops/s",
            ">= 3000/s",
            ok=lambda lo, v: v is not None and v >= 3000,
        ),
        "extract": Row(f"untar: create+write+close x{n}, no fsync", "files/s", "-"),
        "p50": Row(
            f"4K pwrite+fsync p50 x{iters}",
            "ms",
            "<= 1 ms",
            ok=lambda lo, v: v is not None and v <= 1.0,
        ),
        "p99": Row(
            f"4K pwrite+fsync p99 x{iters}",
            "ms",
            "<= 5 ms",
            ok=lambda lo, v: v is not None and v <= 5.0,
        ),
        "rss": Row(
            "daemon peak RSS (VmHWM)",
            "MiB",
            "< 300 MiB",
            ok=lambda lo, v: v is not None and v < 300,
        ),
    }

    def attempt(key: str, side: str, fn: Callable[[], float]) -> None:
        row = rows[key]
        try:
            value = fn()
        except Exception as e:
            if not args.keep_going:
                raise
            row.error = f"{side}: {type(e).__name__}: {e}"
            traceback.print_exc()
            return
        setattr(row, "local" if side == "local" else "vs", value)
        print(f"  {side:9} {row.name}: {fmt(value)} {row.unit}", flush=True)

    def phases(root: Path, side: str, recache: Callable[[Path], str]) -> None:
        big = root / "big.bin"
        attempt("write", side, lambda: seq_write(big, blocks, src))
        how = recache(big)
        print(f"  {side:9} cache dropped ({how})", flush=True)
        attempt("read", side, lambda: seq_read(big, blocks, src))
        with contextlib.suppress(OSError):
            big.unlink()
        small = root / "small"
        attempt("create", side, lambda: create_small(small, n))
        attempt("stat", side, lambda: stat_small(small, n))
        attempt("list", side, lambda: list_small(small, n))
        attempt("rename", side, lambda: rename_delete(small, n))
        attempt("extract", side, lambda: extract_tree(root / "tree", n))
        lat: dict[str, float] = {}

        def latency() -> float:
            lat["p50"], lat["p99"] = pwrite_fsync(root / "lat.bin", iters)
            return lat["p50"]

        attempt("p50", side, latency)
        if "p99" in lat:
            setattr(rows["p99"], "local" if side == "local" else "vs", lat["p99"])
            print(f"  {side:9} {rows['p99'].name}: {fmt(lat['p99'])} ms", flush=True)

    local = base / "local"
    local.mkdir()
    print(f"local directory: {local}", flush=True)
    phases(local, "local", lambda p: drop_caches([p]))

    def remount(p: Path) -> str:
        vs.stop()
        how = drop_caches([])
        vs.start()
        return f"umount + {how} + remount"

    print(f"vaultsync mount: {vs.mnt}", flush=True)
    vs.start()
    phases(vs.mnt, "vaultsync", remount)
    vs.stop()
    rows["rss"].vs = rss.peak_mib
    return list(rows.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="sequential file size")
    ap.add_argument("--files", type=int, default=5000, help="small files to create")
    ap.add_argument("--iterations", type=int, default=2000, help="pwrite+fsync iterations")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temp dir (one disk)")
    ap.add_argument("--keep-going", action="store_true", help="report failed workloads, go on")
    args = ap.parse_args()
    if args.size_mib < 4 or args.files < 1 or args.iterations < 2:
        ap.error("need --size-mib >= 4, --files >= 1 and --iterations >= 2")

    frame = RunFrame.start("vs-fsbench-", args.dir)
    rss = PeakRss()
    vs = VaultsyncSide(frame.base, rss)
    rows: list[Row] = []

    def work() -> None:
        vs.setup()
        print(vs.events[-1], flush=True)
        rows.extend(run(args, frame.base, rss, vs))

    def teardown() -> None:
        try:
            vs.teardown()
        finally:
            rss.stop()

    if not frame.guard(work, teardown):
        return 130
    frame.summary(
        f"fs_bench: --size-mib {args.size_mib} --files {args.files} --iterations {args.iterations}"
    )
    print_table(rows)
    for e in vs.events:
        print(f"  {e}")
    bad = [r for r in rows if r.verdict in ("FAIL", "ERROR")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
