"""Chunk pipeline throughput: hash + compress + append + fsync, against a plain write.

    .venv/bin/python benchmarks/chunk_pipeline.py [--size-mib 1024] [--dir /tmp]

Mixed data: half incompressible (random), half text-like (compresses about
3:1); every block is distinct, so deduplication does not flatter the result.
The reference writes the same bytes to a plain file in the same directory and
fsyncs it. Prints both rates and their ratio; not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vaultsync.engine.volume import Volume
from vaultsync.format.header import new_header
from vaultsync.format.txn import SetBlocks, SetDirent, SetInode

BLOCK = 1 << 20
WORDS = (
    b"replica segment journal bucket provider chunk catalog volume fsync lease epoch "
    b"restore snapshot mount target quorum watermark sealed torn checksum"
).split()


def blocks(total: int, seed: int = 7) -> Iterator[bytes]:
    rng = random.Random(seed)
    text = b" ".join(rng.choice(WORDS) for _ in range(BLOCK // 4))[: BLOCK - 16]
    for i in range(total // BLOCK):
        if i % 2:
            yield os.urandom(BLOCK)
        else:
            cut = rng.randrange(len(text))
            yield i.to_bytes(16, "little") + text[cut:] + text[:cut]


async def run_vaultsync(directory: Path, total: int, inflight: int) -> float:
    header = new_header("bench", BLOCK, 3)
    vol = await Volume.create(directory, header)
    await vol.commit([SetInode(ino=2, mode=stat.S_IFREG | 0o644), SetDirent(1, b"bench", 2)])
    sem = asyncio.Semaphore(inflight)
    tasks: list[asyncio.Task[None]] = []
    t0 = time.perf_counter()

    async def one(blockno: int, data: bytes) -> None:
        try:
            [chunk] = await vol.prepare_chunks([data])
            await vol.commit([SetBlocks(2, ((blockno, chunk.id.hex(), len(data)),))], [chunk])
        finally:
            sem.release()

    for i, data in enumerate(blocks(total)):
        await sem.acquire()
        tasks.append(asyncio.create_task(one(i, data)))
    await asyncio.gather(*tasks)
    await vol.sync()
    elapsed = time.perf_counter() - t0
    await vol.close()
    return elapsed


def run_plain(path: Path, total: int) -> float:
    t0 = time.perf_counter()
    with path.open("wb") as f:
        for data in blocks(total):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--inflight", type=int, default=4, help="blocks prepared concurrently")
    args = ap.parse_args()
    total = args.size_mib * BLOCK
    base = Path(tempfile.mkdtemp(prefix="vs-bench-", dir=args.dir))
    try:
        t_gen0 = time.perf_counter()
        for _ in blocks(total):
            pass
        t_gen = time.perf_counter() - t_gen0
        t_plain = run_plain(base / "plain.bin", total) - t_gen
        (base / "plain.bin").unlink()
        t_vs = asyncio.run(run_vaultsync(base / "vol", total, args.inflight)) - t_gen
        journal = sum(p.stat().st_size for p in (base / "vol" / "journal").glob("*.seg"))
        mb = total / 1e6
        print(f"data: {args.size_mib} MiB mixed (generation time {t_gen:.2f}s subtracted)")
        print(f"plain write+fsync:      {mb / t_plain:8.1f} MB/s")
        print(f"vaultsync pipeline:     {mb / t_vs:8.1f} MB/s  (journal {journal / 1e6:.0f} MB)")
        print(f"ratio vaultsync/plain:  {t_plain / t_vs:8.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
