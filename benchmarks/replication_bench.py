"""Replication cost: fsync latency with async and sync targets, async lag, upload overhead.

    .venv/bin/python benchmarks/replication_bench.py [--iterations 1000] [--lag-seconds 60]
        [--rate-mb 20] [--dir /tmp] [--keep]

Needs root (or /dev/fuse and fusermount3) and the `weed` binary. One SeaweedFS
is started on loopback for the whole run; every volume gets a bucket of its own
and a real mount daemon (tests/mounting.py). In order:

1. The floor: a bare 4 KiB PUT (ObjectStore.put, a new key each time: the
   request every tail piece is) to that SeaweedFS, p50 and p99; and for
   reference the same PUT through botocore's put_object (what ObjectStore.put
   was before small bodies were signed by s3put.py, about 0.8 ms slower here).
2. 4 KiB write + fsync, --iterations times each (after a few untimed warm-up
   rounds), on a plain local directory, on a mount with one async target and
   on a mount with one sync target (both with the product's default segment
   settings). Two patterns: overwrite in place (pwrite at offset 0 of an
   existing 4 KiB file) and append (O_APPEND; the file grows by 4 KiB a time).
   One sample is the write and the fsync together; every buffer is distinct
   random data, so nothing compresses or deduplicates.
3. Async lag: a fresh volume with segment_size "8MiB" and segment_max_age 0.5
   and one async target, written at a steady --rate-mb MB/s (1 MB = 10^6
   bytes) in paced 1 MiB writes of incompressible, never-repeating data for
   --lag-seconds; lag_seconds of STATE_DIR/replication.json is sampled every
   0.5 s while the writes go on. Then one fsync, and the time until the target
   holds everything (lag_lsn 0).
4. Upload overhead: the target's uploaded_bytes (replication.json after
   umount) per byte the benchmark wrote, for the lag run and the two latency
   runs; the local journal's size splits it into journaling and shipping.

Prints measure, figure, target and result; exits with status 1 if a target is
missed or a phase failed (the other phases still run). Mounts, daemons,
SeaweedFS and temp files are cleaned up on exit, error, Ctrl-C or SIGTERM;
--keep leaves the temp dir (daemon logs, state dirs) for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.mounting when run as a script

from benchmarks.harness import Row, RunFrame, SeaweedBench, write_all  # noqa: E402
from tests.support.mounting import Mount  # noqa: E402
from vaultsync.config import TargetConfig  # noqa: E402
from vaultsync.store.objectstore import ObjectStore  # noqa: E402

MIB = 1 << 20
SMALL = 4096
WARMUP = 10
TARGET_NAME = "sw"
LAG_SEGMENT_SIZE = "8MiB"
LAG_SEGMENT_MAX_AGE = 0.5
SAMPLE_EVERY = 0.5
# Targets (the brief's numbers).
SYNC_P50_VS_PUT = 1.2
SYNC_P99_MS = 15.0
LAG_P99_S = 2.0
UPLOAD_RATIO = 1.05


# -- small helpers -----------------------------------------------------------------------
def pct(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty sample."""
    s = sorted(samples)
    return s[max(0, min(len(s) - 1, math.ceil(q * len(s)) - 1))]


def journal_bytes(state_dir: Path) -> int:
    total = 0
    for p in (state_dir / "journal").glob("*.seg"):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def read_status(state_dir: Path) -> dict[str, Any] | None:
    """This target's entry in replication.json, with the file's updated_at; None if absent."""
    try:
        doc = json.loads((state_dir / "replication.json").read_text())
        st = dict(doc["targets"][TARGET_NAME])
        st["updated_at"] = doc["updated_at"]
        return st
    except (OSError, ValueError, KeyError):
        return None


class Incompressible:
    """Never-repeating random 1 MiB blocks, generated before the timed loop.

    A pool of random blocks, each reused with the first 16 bytes of every 4 KiB
    replaced by pre-generated random bytes of its own: all of it is random (zstd
    gains nothing) and no 4 KiB-aligned piece repeats (nothing deduplicates).
    """

    def __init__(self, blocks: int, pool: int = 16) -> None:
        self.pool = [os.urandom(MIB) for _ in range(pool)]
        self.stamps = memoryview(os.urandom(16 * (MIB // SMALL) * blocks))
        self.buf = bytearray(MIB)

    def block(self, i: int) -> bytearray:
        buf = self.buf
        buf[:] = self.pool[i % len(self.pool)]
        base = i * 16 * (MIB // SMALL)
        for k, off in enumerate(range(0, MIB, SMALL)):
            buf[off : off + 16] = self.stamps[base + 16 * k : base + 16 * k + 16]
        return buf


# -- workloads -----------------------------------------------------------------------------
@dataclass
class Latency:
    overwrite: list[float] = field(default_factory=list)  # seconds
    append: list[float] = field(default_factory=list)
    written: int = 0  # every byte the workload wrote, warm-up included
    # Journal growth per phase (mounts only): (bytes written, journal bytes added).
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)


def write_fsync_latency(
    d: Path,
    iterations: int,
    journal: Callable[[], int] | None = None,
    between: Callable[[], None] | None = None,
) -> Latency:
    """4 KiB write + fsync: overwrite at offset 0 of a 4 KiB file, then appends.

    `between` runs after every round, outside the timing (the interleaved PUT floor).
    """
    n = WARMUP + iterations
    bufs = [os.urandom(SMALL) for _ in range(2 * n + 1)]
    out = Latency()

    def phase(name: str, path: Path, flags: int, first: bytes | None, pos: int | None) -> None:
        j0 = journal() if journal else 0
        w0 = out.written
        fd = os.open(path, flags, 0o644)
        try:
            if first is not None:  # untimed: the file exists and is durable first
                write_all(fd, first)
                os.fsync(fd)
                out.written += len(first)
            lat = out.overwrite if pos is not None else out.append
            base = 0 if pos is not None else n
            for i in range(n):
                buf = bufs[base + i]
                t0 = time.perf_counter()
                k = os.pwrite(fd, buf, pos) if pos is not None else os.write(fd, buf)
                os.fsync(fd)
                dt = time.perf_counter() - t0
                if k != SMALL:
                    raise RuntimeError(f"short write to {path}: {k} bytes")
                out.written += SMALL
                if i >= WARMUP:
                    lat.append(dt)
                if between is not None:
                    between()
        finally:
            os.close(fd)
        if journal:
            out.phases[name] = (out.written - w0, journal() - j0)

    phase("overwrite", d / "overwrite.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, bufs[-1], 0)
    phase("append", d / "append.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, None, None)
    return out


async def put_latency(target: TargetConfig, iterations: int) -> tuple[list[float], list[float]]:
    """Seconds per bare 4 KiB PUT, each to a new key, with the replicator's client settings:
    through ObjectStore.put (what tail pieces use), and through botocore's put_object for
    reference (the path every PUT took before small ones were signed in s3put.py)."""
    n = WARMUP + iterations
    bufs = [os.urandom(SMALL) for _ in range(n)]
    lat: list[float] = []
    boto: list[float] = []
    async with ObjectStore(target, connect_timeout=3, read_timeout=30, max_attempts=3) as store:
        client = store._client  # the reference only: a benchmark may look inside
        for i in range(n):
            t0 = time.perf_counter()
            await store.put(f"bench/put/{i:06d}", bufs[i])
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            await client.put_object(
                Bucket=target.bucket, Key=f"{target.prefix}bench/boto/{i:06d}", Body=bufs[i]
            )
            db = time.perf_counter() - t0
            if i >= WARMUP:
                lat.append(dt)
                boto.append(db)
    return lat, boto


class PutProbe:
    """One bare 4 KiB PUT per call, from a private event loop: the floor, interleaved.

    Called between the sync run's write+fsync rounds, so floor and fsync see the
    same host and server load on a busy machine; every PUT goes to a new key.
    """

    def __init__(self, target: TargetConfig, rounds: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = ObjectStore(target, connect_timeout=3, read_timeout=30, max_attempts=3)
        self.bufs = [os.urandom(SMALL) for _ in range(rounds)]
        self.lat: list[float] = []
        self.i = 0
        self.loop.run_until_complete(self.store.__aenter__())

    def __call__(self) -> None:
        buf = self.bufs[self.i % len(self.bufs)]
        t0 = time.perf_counter()
        self.loop.run_until_complete(self.store.put(f"bench/floor/{self.i:06d}", buf))
        self.lat.append(time.perf_counter() - t0)
        self.i += 1

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.store.__aexit__(None, None, None))
        finally:
            self.loop.close()


@dataclass
class Sample:
    t: float  # when replication.json was written, in seconds since the writes started
    lag_seconds: float
    lag_bytes: int
    queue_segments: int
    uploaded: int  # the target's uploaded_bytes then
    written: int  # bytes the writer had handed to write() when the sample was read
    journal: int  # bytes in the local journal when the sample was read
    read_t: float  # when the sample was read, in seconds since the writes started


@dataclass
class LagRun:
    samples: list[Sample] = field(default_factory=list)  # from status written during the run
    stale: int = 0  # samples dropped: that status predates the first write
    written: int = 0
    write_done: list[float] = field(default_factory=list)  # when block i's write() returned
    elapsed: float = 0.0  # writing time
    late_max: float = 0.0  # how far the writer fell behind its schedule, at worst
    final_fsync: float = 0.0
    drain: float | None = None  # after the final fsync, until lag_lsn == 0

    def _age(self, t: float, held_bytes: float) -> float:
        """Age at `t` of the oldest written byte beyond `held_bytes` of the stream."""
        held = int(held_bytes) // MIB  # first block not wholly held
        done = bisect.bisect_right(self.write_done, t)  # blocks written by then
        return t - self.write_done[held] if held < done else 0.0

    def end_to_end(self, overhead: float) -> list[float]:
        """Per sample: age of the oldest written byte the target did not hold yet.

        The target's uploaded_bytes, divided by the journal's overhead, is how
        far into the stream it holds; compared with when each block was written.
        """
        return [self._age(s.t, s.uploaded / overhead) for s in self.samples]

    def not_in_journal(self, overhead: float) -> list[float]:
        """Per sample: age of the oldest written byte not in the local journal yet."""
        return [self._age(s.read_t, s.journal / overhead) for s in self.samples]


def steady_write(m: Mount, rate: float, seconds: float, src: Incompressible) -> LagRun:
    """Paced 1 MiB writes at `rate` bytes/s while a thread samples replication.json."""
    blocks = len(src.stamps) // (16 * (MIB // SMALL))
    interval = MIB / rate
    run = LagRun()
    stop = threading.Event()
    t0, wall0 = time.monotonic(), time.time()

    def sampler() -> None:
        due = time.monotonic()
        while not stop.is_set():
            st = read_status(m.state_dir)
            if st is not None and st["updated_at"] < wall0:
                run.stale += 1
            elif st is not None:
                run.samples.append(
                    Sample(
                        float(st["updated_at"]) - wall0,
                        float(st["lag_seconds"]),
                        int(st["lag_bytes"]),
                        int(st.get("queue_segments", 0)),
                        int(st["uploaded_bytes"]),
                        run.written,
                        journal_bytes(m.state_dir),
                        time.monotonic() - t0,
                    )
                )
            due += SAMPLE_EVERY
            stop.wait(max(0.0, due - time.monotonic()))

    fd = os.open(m.mountpoint / "stream.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    th = threading.Thread(target=sampler, name="lag-sampler", daemon=True)
    try:
        th.start()
        for i in range(blocks):
            due = t0 + i * interval
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                run.late_max = max(run.late_max, now - due)
            write_all(fd, src.block(i))
            run.write_done.append(time.monotonic() - t0)
            run.written += MIB
        run.elapsed = time.monotonic() - t0
        stop.set()
        th.join()
        f0 = time.monotonic()
        os.fsync(fd)
        run.final_fsync = time.monotonic() - f0
    finally:
        stop.set()
        os.close(fd)
    # Until the target holds everything: a status written after the fsync says lag_lsn 0.
    wall = time.time()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = read_status(m.state_dir)
        if st is not None and st["updated_at"] > wall and st["lag_lsn"] == 0:
            run.drain = time.monotonic() - f0
            break
        time.sleep(0.1)
    return run


# -- results -----------------------------------------------------------------------------


def ms(x: float) -> str:
    return f"{x * 1e3:.2f} ms"


# -- the run -------------------------------------------------------------------------------
class Bench(SeaweedBench):
    TARGET_NAME = TARGET_NAME

    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        super().__init__(args, base)
        self.put_p50: float | None = None

    def target(self, mode: str, bucket_prefix: str = "rb-") -> TargetConfig:
        return super().target(mode, bucket_prefix)

    @classmethod
    def toml(cls, t: TargetConfig, volume_extra: str = "") -> str:
        return volume_extra + cls.targets_toml(t)

    def mounted(
        self, name: str, toml: str, body: Callable[[Mount], Any]
    ) -> tuple[Any, dict[str, Any], int, float]:
        """Create, mount, run `body`, umount; (result, final status, journal bytes, umount s)."""
        m = Mount.create(self.base / name, toml)
        self.mounts.append(m)
        m.start(timeout=120)
        result = body(m)
        t0 = time.perf_counter()
        m.umount()
        took = time.perf_counter() - t0
        st = read_status(m.state_dir)
        if st is None:
            raise RuntimeError(f"{m.state_dir}/replication.json missing after umount")
        return result, st, journal_bytes(m.state_dir), took

    # phases
    def floor(self) -> None:
        lat, boto = asyncio.run(put_latency(self.target("async"), self.args.iterations))
        self.rows += [
            Row("bare 4 KiB PUT p50 (standalone, first)", ms(pct(lat, 0.5))),
            Row("bare 4 KiB PUT p99 (standalone, first)", ms(pct(lat, 0.99))),
            Row("  reference: the same PUT through botocore, p50", ms(pct(boto, 0.5))),
        ]

    def latency_rows(self, label: str, lat: Latency, sync: bool) -> None:
        for kind, xs in (("overwrite", lat.overwrite), ("append", lat.append)):
            p50, p99 = pct(xs, 0.5), pct(xs, 0.99)
            if sync and self.put_p50 is not None:
                limit = SYNC_P50_VS_PUT * self.put_p50
                self.rows.append(
                    Row(
                        f"{label} {kind} p50",
                        f"{ms(p50)} ({p50 / self.put_p50:.2f}x PUT)",
                        f"<= {SYNC_P50_VS_PUT}x PUT = {ms(limit)}",
                        p50 <= limit,
                    )
                )
            else:
                self.rows.append(Row(f"{label} {kind} p50", ms(p50)))
            figure = f"{ms(p99)} (max {max(xs) * 1e3:.1f})"
            if sync:
                slow = sum(x * 1e3 > SYNC_P99_MS for x in xs)
                self.rows.append(
                    Row(
                        f"{label} {kind} p99",
                        f"{figure} [{slow}/{len(xs)} > {SYNC_P99_MS:.0f}]",
                        f"<= {SYNC_P99_MS:.0f} ms",
                        p99 * 1e3 <= SYNC_P99_MS,
                    )
                )
            else:
                self.rows.append(Row(f"{label} {kind} p99", figure))

    def plain(self) -> None:
        d = self.base / "plain"
        d.mkdir()
        self.latency_rows("plain dir", write_fsync_latency(d, self.args.iterations), False)

    def mount_latency(self, mode: str) -> None:
        t = self.target(mode)
        rounds = 2 * (WARMUP + self.args.iterations)
        probe = PutProbe(self.target("async"), rounds) if mode == "sync" else None

        def body(m: Mount) -> Latency:
            return write_fsync_latency(
                m.mountpoint,
                self.args.iterations,
                lambda: journal_bytes(m.state_dir),
                probe,
            )

        try:
            lat, st, jbytes, took = self.mounted(f"lat-{mode}", self.toml(t), body)
        finally:
            if probe is not None:
                probe.close()
        if probe is not None:
            floor = probe.lat[WARMUP:]
            self.put_p50 = pct(floor, 0.5)
            self.rows += [
                Row("bare 4 KiB PUT p50 (interleaved: the floor)", ms(self.put_p50)),
                Row("bare 4 KiB PUT p99 (interleaved)", ms(pct(floor, 0.99))),
            ]
        self.latency_rows(f"{mode} target", lat, mode == "sync")
        ratio = st["uploaded_bytes"] / lat.written
        self.rows.append(Row(f"{mode} latency run: uploaded/written", f"{ratio:.2f}"))
        split = ", ".join(
            f"{k} journal/written {j / w:.2f}" for k, (w, j) in lat.phases.items() if w
        )
        self.notes.append(
            f"{mode} latency run (default segment settings): written {lat.written:,} B, "
            f"journal {jbytes:,} B ({jbytes / lat.written:.2f}x; {split}), uploaded "
            f"{st['uploaded_bytes']:,} B in {st['uploaded_objects']} objects "
            f"({st['uploaded_bytes'] / max(1, jbytes):.2f}x the journal); umount {took:.1f}s"
        )

    def lag(self) -> None:
        args = self.args
        rate = args.rate_mb * 1e6
        blocks = max(1, int(rate * args.lag_seconds // MIB))
        t0 = time.perf_counter()
        src = Incompressible(blocks)
        gen = time.perf_counter() - t0
        t = self.target("async")
        extra = f'segment_size = "{LAG_SEGMENT_SIZE}"\nsegment_max_age = {LAG_SEGMENT_MAX_AGE}\n'

        def body(m: Mount) -> LagRun:
            return steady_write(m, rate, args.lag_seconds, src)

        run, st, jbytes, took = self.mounted("lag", self.toml(t, extra), body)
        if not run.samples:
            raise RuntimeError("no replication.json sample was taken during the writes")
        lags = [s.lag_seconds for s in run.samples]
        p99 = pct(lags, 0.99)
        e2e = run.end_to_end(jbytes / run.written)
        self.rows += [
            Row(f"async lag p50 ({args.rate_mb:g} MB/s steady)", f"{pct(lags, 0.5):.2f} s"),
            Row("async lag p99", f"{p99:.2f} s", f"<= {LAG_P99_S:.0f} s", p99 <= LAG_P99_S),
            Row("async lag max", f"{max(lags):.2f} s"),
            Row("async end-to-end lag p50 (write() -> target)", f"{pct(e2e, 0.5):.2f} s"),
            Row("async end-to-end lag p99", f"{pct(e2e, 0.99):.2f} s"),
            Row("async end-to-end lag max", f"{max(e2e):.2f} s"),
        ]
        ratio = st["uploaded_bytes"] / run.written
        self.rows.append(
            Row(
                "async bulk: uploaded/written",
                f"{ratio:.4f}",
                f"<= {UPLOAD_RATIO}",
                ratio <= UPLOAD_RATIO,
            )
        )
        backlog = max(s.written - s.journal for s in run.samples)
        unjournaled = run.not_in_journal(jbytes / run.written)
        drain = "not within 60 s" if run.drain is None else f"{run.drain:.2f}s"
        self.notes += [
            f"lag run: segment_size {LAG_SEGMENT_SIZE}, segment_max_age {LAG_SEGMENT_MAX_AGE}; "
            f"{run.written / 1e6:,.0f} MB in {run.elapsed:.1f}s = "
            f"{run.written / 1e6 / run.elapsed:.2f} MB/s achieved (asked {args.rate_mb:g}); "
            f"writer at most {run.late_max * 1e3:.0f} ms behind schedule; "
            f"data generated in {gen:.1f}s beforehand",
            f"lag run: {len(run.samples)} samples every {SAMPLE_EVERY}s "
            f"({len({s.t for s in run.samples})} distinct status writes; {run.stale} dropped "
            f"as older than the first write); max lag_bytes "
            f"{max(s.lag_bytes for s in run.samples) / 1e6:.1f} MB, max queue_segments "
            f"{max(s.queue_segments for s in run.samples)}, max written-but-not-in-journal "
            f"{backlog / 1e6:.1f} MB (kernel page cache + daemon buffers)",
            f"lag run: of the end-to-end lag, the oldest byte not yet in the local journal "
            f"(kernel page cache or daemon buffer) was p50 {pct(unjournaled, 0.5):.2f}s, "
            f"max {max(unjournaled):.2f}s old; lag_seconds only sees the journal's part",
            f"lag run: final fsync {run.final_fsync:.2f}s, then target caught up in {drain}; "
            f"umount {took:.1f}s",
            f"lag run: written {run.written:,} B, journal {jbytes:,} B "
            f"({jbytes / run.written:.4f}x), uploaded {st['uploaded_bytes']:,} B in "
            f"{st['uploaded_objects']} objects ({st['uploaded_bytes'] / max(1, jbytes):.4f}x "
            f"the journal)",
        ]
        first = {s.t: k for k, s in reversed(list(enumerate(run.samples)))}
        by_lag = sorted(first.values(), key=lambda k: -lags[k])[:5]
        self.notes.append(
            "lag run: worst samples (t, lag_seconds, end-to-end, lag_bytes MB, queued): "
            + "; ".join(
                f"{run.samples[k].t:.1f}s {lags[k]:.2f} {e2e[k]:.2f} "
                f"{run.samples[k].lag_bytes / 1e6:.1f} {run.samples[k].queue_segments}"
                for k in sorted(by_lag)
            )
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1000, help="write+fsync rounds per pattern")
    ap.add_argument("--lag-seconds", type=float, default=60, help="length of the steady write")
    ap.add_argument("--rate-mb", type=float, default=20, help="steady write rate, MB/s")
    ap.add_argument("--dir", type=Path, default=None, help="parent of the temp dir (one disk)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, state)")
    args = ap.parse_args()
    if args.iterations < 2 or args.lag_seconds <= 0 or args.rate_mb <= 0:
        ap.error("need --iterations >= 2, --lag-seconds > 0 and --rate-mb > 0")

    frame = RunFrame.start("vs-replbench-", args.dir)
    bench = Bench(args, frame.base)

    def work() -> None:
        bench.attempt("starting SeaweedFS", bench.start_provider)
        if bench.provider is not None:
            bench.attempt("bare PUT floor", bench.floor)
            bench.attempt("plain directory latency", bench.plain)
            bench.attempt("async target latency", lambda: bench.mount_latency("async"))
            bench.attempt("sync target latency", lambda: bench.mount_latency("sync"))
            bench.attempt("async lag under steady writes", bench.lag)

    if not frame.guard(work, bench.teardown, keep=args.keep):
        return 130
    frame.summary(
        f"replication_bench: --iterations {args.iterations} (+{WARMUP} warm-up) "
        f"--lag-seconds {args.lag_seconds:g} --rate-mb {args.rate_mb:g}"
    )
    return bench.report()


if __name__ == "__main__":
    sys.exit(main())
