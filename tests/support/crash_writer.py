"""Child process for test_crash: commit files forever, print each acknowledgement.

A line `ack <ino> <blake3 of contents>` is printed only after commit(durable=True)
returned, so every printed line is a promise the parent can hold us to after
it kills this process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from blake3 import blake3

from tests.support.volume_helpers import file_ops
from vaultsync.engine.volume import Volume


async def main(state: Path, start_ino: int, seed: int) -> None:
    rng = random.Random(seed)
    vol = await Volume.open(state, segment_size=64 * 1024)
    ino = start_ino
    while True:
        pieces = [rng.randbytes(rng.randint(1, 40_000)) for _ in range(rng.randint(1, 3))]
        prepared = await vol.prepare_chunks(pieces)
        ops = file_ops(ino, f"f{ino}".encode(), [(p.id, p.length) for p in prepared])
        await vol.commit(ops, prepared, durable=rng.random() < 0.7)
        if rng.random() < 0.7:
            await vol.sync()
            digest = blake3(b"".join(pieces)).hexdigest()
            sys.stdout.write(f"ack {ino} {digest}\n")
            sys.stdout.flush()
        ino += 1


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
