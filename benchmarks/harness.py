"""What the benchmark scripts share: the result table, the load line, signal handling,
the temp dir and its cleanup.

Each script measures its own workload; this keeps how results are shown and how
a run is interrupted the same everywhere, so figures from different scripts
read alike in notes.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.mounting import Mount
from vaultsync.commands.local_servers import LocalProvider, start_seaweedfs
from vaultsync.config import TargetConfig


def loadavg() -> str:
    """The 1/5/15-minute load: on a shared machine a figure means little without it."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def write_all(fd: int, buf: bytes | bytearray | memoryview) -> None:
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view) :]


def raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: unwind like Ctrl-C, so mounts and servers are torn down."""
    raise KeyboardInterrupt


@dataclass
class Row:
    measure: str
    figure: str
    target: str = "-"
    ok: bool | None = None  # None: information only

    @property
    def verdict(self) -> str:
        if self.figure == "ERROR":
            return "ERROR"
        return "-" if self.ok is None else ("PASS" if self.ok else "FAIL")


def print_grid(head: Sequence[str], body: Sequence[Sequence[str]], left: set[int]) -> None:
    """A plain-text table: columns in `left` flush left, the others (figures) right."""
    widths = [max(len(x[c]) for x in [head, *body]) for c in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for k, cells in enumerate([head, *body]):
        cols = (
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        print("  ".join(cols).rstrip())
        if k == 0:
            print(line)
    print(line)


def print_table(rows: list[Row]) -> None:
    head = ["measure", "figure", "target", "result"]
    print_grid(head, [[r.measure, r.figure, r.target, r.verdict] for r in rows], {0, 2, 3})


@dataclass
class RunFrame:
    """One run's temp dir, start time and load, and the promise that an interrupted
    run (Ctrl-C, SIGTERM, an error) leaves no mount, server or temp dir behind."""

    base: Path
    t0: float = field(default_factory=time.perf_counter)
    load0: str = field(default_factory=loadavg)

    @classmethod
    def start(cls, prefix: str, parent: Path | None) -> RunFrame:
        signal.signal(signal.SIGTERM, raise_interrupt)
        return cls(Path(tempfile.mkdtemp(prefix=prefix, dir=parent)))

    def guard(
        self, work: Callable[[], None], teardown: Callable[[], None], keep: bool = False
    ) -> bool:
        """Run `work`, then `teardown` and remove the temp dir (unless `keep`) whatever
        happened, with Ctrl-C and SIGTERM held off until the cleanup is done. False if
        the run was interrupted: the script then exits with status 130."""
        try:
            print(f"working under {self.base}; load average {self.load0}", flush=True)
            work()
        except KeyboardInterrupt:
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return False
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cleanup finish
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                teardown()
            finally:
                if keep:
                    print(f"kept {self.base}", file=sys.stderr)
                else:
                    shutil.rmtree(self.base, ignore_errors=True)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return True

    def summary(self, settings: str) -> None:
        """The line above the table: what ran, how long, and how busy the machine was."""
        print()
        print(
            f"{settings}; {time.perf_counter() - self.t0:.0f}s in all; load average "
            f"{self.load0} at start, {loadavg()} at end ({os.cpu_count()} CPUs)"
        )


class SeaweedBench:
    """A benchmark's phases against one SeaweedFS on loopback: the server, a fresh bucket
    per target, the mounts to clean up, the result rows and the notes under them.

    Each phase runs through `attempt`: one that fails is an ERROR row, and the others
    still run."""

    TARGET_NAME = "sw"

    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.provider: LocalProvider | None = None
        self.creds: Path | None = None
        self.mounts: list[Mount] = []
        self.rows: list[Row] = []
        self.notes: list[str] = []

    def start_provider(self) -> None:
        ak, sk = "VS" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)
        t0 = time.perf_counter()
        self.provider = start_seaweedfs(self.base / "seaweedfs", access_key=ak, secret_key=sk)
        self.creds = self.base / "sw.creds"
        fd = os.open(self.creds, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"access_key_id = {ak}\nsecret_access_key = {sk}\n")
        self.notes.append(
            f"SeaweedFS pid {self.provider.pid} at {self.provider.endpoint}, "
            f"ready in {time.perf_counter() - t0:.1f}s"
        )

    def target(self, mode: str, bucket_prefix: str) -> TargetConfig:
        """A target in a bucket of its own, so that runs never see each other's objects."""
        assert self.provider is not None and self.creds is not None
        bucket = bucket_prefix + secrets.token_hex(6)
        self.provider.create_bucket(bucket)
        return TargetConfig.model_validate(
            {
                "name": self.TARGET_NAME,
                "endpoint": self.provider.endpoint,
                "bucket": bucket,
                "prefix": "vol/",
                "mode": mode,
                "credentials": {"file": str(self.creds)},
            }
        )

    @staticmethod
    def targets_toml(t: TargetConfig) -> str:
        assert t.credentials.file is not None
        return (
            f'\n[[targets]]\nname = "{t.name}"\nendpoint = "{t.endpoint}"\n'
            f'bucket = "{t.bucket}"\nprefix = "{t.prefix}"\nmode = "{t.mode}"\n'
            f'credentials = {{ file = "{t.credentials.file}" }}\n'
        )

    def teardown(self) -> None:
        for m in self.mounts:
            try:
                m.cleanup()  # umount if still up; kill -9 + lazy unmount if that fails
            except Exception as e:
                print(f"cleanup of {m.mountpoint} failed: {e}", file=sys.stderr)
        if self.provider is not None:
            self.provider.stop(grace=10)

    def attempt(self, what: str, fn: Callable[[], None]) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {what} ...", flush=True)
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            self.rows.append(Row(what, "ERROR", f"{type(e).__name__}: {e}"[:80]))

    def report(self) -> int:
        """The table and the notes; exit status 1 if a target was missed or a phase failed."""
        print_table(self.rows)
        for n in self.notes:
            print(f"  {n}")
        return 1 if any(r.verdict in ("FAIL", "ERROR") for r in self.rows) else 0
