"""What the benchmark scripts share: the result table, the load line, signal handling.

Each script measures its own workload; this keeps how results are shown and how
a run is interrupted the same everywhere, so figures from different scripts
read alike in notes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


def print_table(rows: list[Row]) -> None:
    head = ["measure", "figure", "target", "result"]
    body = [[r.measure, r.figure, r.target, r.verdict] for r in rows]
    widths = [max(len(x[c]) for x in [head, *body]) for c in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for k, cells in enumerate([head, *body]):
        cols = (
            c.rjust(w) if i == 1 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        print("  ".join(cols).rstrip())
        if k == 0:
            print(line)
    print(line)
