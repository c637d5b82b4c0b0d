"""Crash drill for small in-place rewrites (stored as patches): kill -9 mid-stream, remount.

A writer rewrites random 4 KiB slots of a 1 MiB file in place, fsyncing each
rewrite: those become patches of the blocks' chunks, rebased when a block is hit
again, whole again past a quarter of a block. It prints `w SLOT VERSION` before a
write and `a SLOT VERSION` once its fsync returned. The daemon is killed at a random
moment; after a remount every slot must hold its last acknowledged version or one
written after it, never another slot's or an older version's bytes.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

from tests.support.mounting import Mount
from vaultsync.format.state_layout import StateDir

SLOT = 4096
SLOTS = 256  # a 1 MiB file: 16 blocks of 64 KiB

WRITER = f"""
import hashlib, os, random, sys
path, seed = sys.argv[1], int(sys.argv[2])
def content(slot, ver):
    return hashlib.sha256(f"{{slot}}:{{ver}}".encode()).digest() * ({SLOT} // 32)
fd = os.open(path, os.O_RDWR)
rng = random.Random(seed)
ver = 0
while True:
    ver += 1
    slot = rng.randrange({SLOTS})
    print("w", slot, ver, flush=True)
    os.pwrite(fd, content(slot, ver), slot * {SLOT})
    os.fsync(fd)
    print("a", slot, ver, flush=True)
"""


def _content(slot: int, ver: int) -> bytes:
    return hashlib.sha256(f"{slot}:{ver}".encode()).digest() * (SLOT // 32)


def test_rewrites_survive_kill9_as_acknowledged(mounted: Mount) -> None:
    path = mounted.mountpoint / "f"
    with open(path, "wb") as f:  # version 0 of every slot, durable first
        f.write(b"".join(_content(s, 0) for s in range(SLOTS)))
        f.flush()
        os.fsync(f.fileno())
    seed = random.SystemRandom().randrange(1 << 30)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert writer.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + random.uniform(1.0, 3.0)
    try:
        while time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            lines.append(line)
        mounted.kill9()
    finally:
        writer.send_signal(signal.SIGKILL)
        rest, _ = writer.communicate(timeout=30)
        lines += rest.splitlines(keepends=True)
    # Per slot: versions written, in order, and the last one acknowledged.
    written: dict[int, list[int]] = {}
    acked: dict[int, int] = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue  # the writer died mid-line
        kind, slot, ver = parts[0], int(parts[1]), int(parts[2])
        if kind == "w":
            written.setdefault(slot, []).append(ver)
        else:
            acked[slot] = ver
    assert sum(1 for _ in acked) >= 5, f"too few acknowledged rewrites (seed {seed})"
    db = sqlite3.connect(f"file:{StateDir(mounted.state_dir).catalog}?mode=ro", uri=True)
    try:
        patches = db.execute("SELECT count(*) FROM chunks WHERE base NOT NULL").fetchone()[0]
    finally:
        db.close()
    assert patches, "the rewrites were not stored as patches: this drill tests nothing new"
    mounted.start()
    data = path.read_bytes()
    assert len(data) == SLOTS * SLOT
    for slot in range(SLOTS):
        got = data[slot * SLOT : (slot + 1) * SLOT]
        floor = acked.get(slot, 0)
        allowed = [floor] + [v for v in written.get(slot, []) if v > floor]
        assert any(got == _content(slot, v) for v in allowed), (
            f"slot {slot}: not version {floor} (acknowledged) or a later one (seed {seed})"
        )
