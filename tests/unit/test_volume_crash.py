"""kill -9 a writer at random moments: every acknowledged commit must survive.

The writer is a real process committing to a real journal and catalog; after
each kill the volume is reopened (which repairs it), checked, and handed to
the next writer, so repairs stack up the way they would on a flaky server.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from blake3 import blake3

from vaultsync.engine.volume import Volume
from vaultsync.format.header import new_header

ROOT = Path(__file__).resolve().parents[2]


async def test_sigkill_never_loses_an_acknowledged_commit(tmp_path: Path) -> None:
    state = tmp_path / "s"
    vol = await Volume.create(state, new_header("crash", 64 * 1024, 1), segment_size=64 * 1024)
    await vol.close()
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    promised: dict[int, str] = {}
    next_ino = 100
    for round_no in range(6):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.crash_writer",
                str(state),
                str(next_ino),
                str(rng.randrange(1 << 30)),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5 + rng.random() * 1.0)  # past startup, into the commit loop
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        acks = [ln.split() for ln in out.splitlines() if ln.startswith("ack ")]
        assert acks or round_no > 0, "the writer never acknowledged anything"
        for _, ino_text, digest in acks:
            promised[int(ino_text)] = digest

        vol = await Volume.open(state, segment_size=64 * 1024)
        try:
            for ino, digest in promised.items():
                blocks = vol.catalog.blocks(ino)
                assert blocks, f"acknowledged file {ino} is gone after kill #{round_no}"
                data = b"".join([await vol.read_chunk(c) for _, (c, _) in sorted(blocks.items())])
                assert blake3(data).hexdigest() == digest, f"file {ino} differs"
            # What survived is a prefix of what was committed: no gaps in inode numbers.
            counts = vol.catalog.counts()
            top = vol.catalog.max_ino()
            assert counts["inodes"] == 1 + (top - 99 if top >= 100 else 0)
            next_ino = top + 1
        finally:
            await vol.close()
    assert len(promised) >= 20, "too few acknowledgements to prove anything"
