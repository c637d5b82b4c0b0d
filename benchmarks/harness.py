"""What the benchmark scripts share: the result table, the load line, signal handling,
the temp dir and its cleanup.

Each script measures its own workload; this keeps how results are shown and how
a run is interrupted the same everywhere, so figures from different scripts
read alike in notes.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


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
