"""Automatic failover, measured: takeover time, bytes downloaded to take over, standby lag.

    .venv/bin/python benchmarks/failover_bench.py [--files 100000] [--size-mib 1024]
        [--failover-after 15] [--rate-mb 20] [--seconds 30] [--dir /tmp] [--keep]

Two sites of one volume on this machine (site A the writer, site B a standby),
three voters (two data targets, one sync and one async, and a witness) in one
SeaweedFS on loopback, each site reaching it through its own proxies. The
volume is filled first (--files small files and --size-mib MiB of
incompressible data), B mounts and catches up, then:

- standby lag: A writes 1 MiB files, each fsynced, at --rate-mb MB/s for
  --seconds; B's mountpoint is polled for each file, and the lag is the time
  from A's fsync returning to the file being readable at B whole (p50, p99);
- takeover: A's daemon is killed with kill -9; the time until a write +
  fsync first succeeds at B's mountpoint (target: failover_after + 5 s), and
  the bytes B downloaded to take over (target: at most two segments plus what
  A wrote in the last failover_after seconds, which here is nothing: A was
  idle for the last seconds before the kill, as after a crash).

Prints a table with targets; exits 1 if one was missed. The reference is the
configured failover_after itself (no local-directory equivalent exists).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Row, RunFrame, print_table, write_all
from tests.support.sites import Site, TargetSpec, sites
from vaultsync.commands.local_servers import start_seaweedfs

SEGMENT = 32 << 20  # the default segment size: the "two segments" of the target


def _fill(root: Path, files: int, size_mib: int) -> None:
    small = root / "small"
    small.mkdir()
    for d in range(0, files, 1000):
        sub = small / f"d{d // 1000:04d}"
        sub.mkdir()
        for i in range(d, min(d + 1000, files)):
            (sub / f"f{i}").write_bytes(os.urandom(64))
    big = root / "big"
    fd = os.open(big, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(size_mib):
            write_all(fd, os.urandom(1 << 20))
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


def _lag(a: Site, b: Site, rate_mb: float, seconds: float) -> list[float]:
    """Write 1 MiB fsynced files at `rate_mb` at A; seconds until each is whole at B."""
    (a.mountpoint / "lag").mkdir()
    written: dict[str, tuple[float, bytes]] = {}
    lags: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while True:
            for name, (t, data) in list(written.items()):
                if name in seen:
                    continue
                try:
                    if (b.mountpoint / "lag" / name).read_bytes() == data:
                        lags.append(time.monotonic() - t)
                        seen.add(name)
                except OSError:
                    pass
            if done.is_set() and (len(seen) == len(written) or time.monotonic() > deadline):
                return
            time.sleep(0.05)

    seen: set[str] = set()
    deadline = float("inf")
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        data = os.urandom(1 << 20)
        name = f"l{n:06d}"
        fd = os.open(a.mountpoint / "lag" / name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        written[name] = (time.monotonic(), data)
        n += 1
        ahead = n * (1 << 20) / (rate_mb * 1e6) - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    deadline = time.monotonic() + 60
    done.set()
    watcher.join(90)
    missing = len(written) - len(lags)
    if missing:
        lags += [float("inf")] * missing
    return lags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--failover-after", type=float, default=15.0)
    ap.add_argument("--rate-mb", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    frame = RunFrame.start("vs-failover-bench-", args.dir)
    rows: list[Row] = []
    state: dict[str, object] = {}

    def work() -> None:
        provider = start_seaweedfs(
            frame.base / "seaweedfs",
            access_key="VS" + uuid.uuid4().hex[:16].upper(),
            secret_key=uuid.uuid4().hex,
        )
        state["provider"] = provider
        tag = uuid.uuid4().hex[:8]
        targets = [
            TargetSpec("d1", f"fb-{tag}-d1", mode="sync"),
            TargetSpec("d2", f"fb-{tag}-d2", mode="async"),
            TargetSpec("w", f"fb-{tag}-w", role="witness"),
        ]
        with sites(
            frame.base,
            provider,
            ["a", "b"],
            targets,
            failover_after=args.failover_after,
            extra="",
        ) as s:
            a, b = s["a"], s["b"]
            a.start()
            a.wait_role("writer", 60)
            print(f"filling: {args.files} files and {args.size_mib} MiB", flush=True)
            t0 = time.monotonic()
            _fill(a.mountpoint, args.files, args.size_mib)
            rows.append(Row("fill (files + MiB, at the writer)", f"{time.monotonic() - t0:.0f} s"))
            t0 = time.monotonic()
            b.start(timeout=3600)
            b.wait_role("standby", 3600)
            b.wait_for("caught up", lambda: (b.mountpoint / "big").exists(), 600)
            rows.append(
                Row("standby's first download (bootstrap)", f"{time.monotonic() - t0:.0f} s")
            )
            print(f"standby lag at {args.rate_mb} MB/s for {args.seconds:.0f} s", flush=True)
            lags = sorted(_lag(a, b, args.rate_mb, args.seconds))
            p50 = statistics.median(lags)
            p99 = lags[min(len(lags) - 1, int(len(lags) * 0.99))]
            rows.append(Row(f"standby lag p50 ({len(lags)} files of 1 MiB)", f"{p50:.2f} s"))
            rows.append(Row("standby lag p99", f"{p99:.2f} s", "<= 5 s", p99 <= 5.0))
            time.sleep(2)  # idle before the crash, as after the last write of a crash
            killed = time.monotonic()
            a.kill9()
            probe = b.mountpoint / "after-takeover"
            while True:
                try:
                    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644)
                    try:
                        os.write(fd, b"x")
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    break
                except OSError:
                    if time.monotonic() - killed > args.failover_after + 120:
                        raise
                    time.sleep(0.1)
            took = time.monotonic() - killed
            limit = args.failover_after + 5
            rows.append(
                Row(
                    "kill -9 of the writer to a write + fsync at the standby",
                    f"{took:.1f} s",
                    f"<= {limit:.0f} s",
                    took <= limit,
                )
            )
            t = b.status()["volume"]["failover"].get("takeover", {})
            got = int(t.get("downloaded_bytes", -1))
            cap = 2 * SEGMENT
            rows.append(
                Row(
                    "bytes downloaded to take over",
                    f"{got / 1e6:.1f} MB",
                    f"<= {cap / 1e6:.0f} MB",
                    0 <= got <= cap,
                )
            )

    def teardown() -> None:
        p = state.get("provider")
        if p is not None:
            p.stop(grace=10)  # type: ignore[attr-defined]

    if not frame.guard(work, teardown, keep=args.keep):
        return 130
    frame.summary(
        f"failover_bench: --files {args.files} --size-mib {args.size_mib} "
        f"--failover-after {args.failover_after:g} --rate-mb {args.rate_mb:g}"
    )
    print_table(rows)
    return 1 if any(r.verdict in ("FAIL", "ERROR") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
