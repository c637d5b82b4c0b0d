"""Batched reads of a recovered point: what restore and point mounts read through.

`ChunkReader.read_chunks` takes two paths for a recovered volume (os.pread from
cached segments, ranged GETs of runs of neighbouring records) and `FileSystem.stream` stitches
blocks together in batches; both must give exactly what `FileSystem.read`
gives, for files with holes, short blocks in the middle, repeated
(deduplicated) blocks and more segments than one run covers, from a real
target.
"""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from pathlib import Path

import pytest

from tests.support.targets import target_for
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.config import Config
from vaultsync.engine.chunk_reader import ChunkReader
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.volume import Volume
from vaultsync.format.txn import ROOT_INO
from vaultsync.points.recovered import RecoveredVolume
from vaultsync.points.recovery import PointSpec, SegmentCache, rebuild
from vaultsync.replication.replicator import Replicator
from vaultsync.store.objectstore import ObjectStore
from vaultsync.store.targets import init_volume

BS = 64 * 1024


async def _write_files(cfg: Config) -> dict[bytes, bytes]:
    """Write the files at the writer, ship everything; their expected contents."""
    await init_volume(cfg, None)
    vol = await Volume.open(cfg.volume.state_dir, segment_size=256 * 1024)
    repl = Replicator(cfg, vol)
    await repl.start()
    fs = FileSystem(vol)
    want: dict[bytes, bytes] = {}
    try:
        same = os.urandom(BS)
        layouts: dict[bytes, list[tuple[int, bytes]]] = {
            # many blocks over several segments, one repeated (deduplicated)
            b"long": [(i * BS, os.urandom(BS) if i % 5 else same) for i in range(40)],
            # a hole of three blocks, then a block written short, then more
            b"holes": [(0, os.urandom(BS)), (4 * BS, os.urandom(1000)), (5 * BS, os.urandom(BS))],
            b"tiny": [(0, b"x")],
            b"empty": [],
        }
        for name, writes in layouts.items():
            node = fs.mknod(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, 0)
            buf = bytearray()
            for k, (off, data) in enumerate(writes):
                await fs.write(node.ino, off, data)
                if k % 8 == 7:  # a new segment now and then
                    await fs.fsync(node.ino)
                    await vol.maybe_seal(force=True)
                buf[len(buf) : off] = bytes(max(0, off - len(buf)))
                buf[off : off + len(data)] = data
            await fs.fsync(node.ino)
            want[name] = bytes(buf)
        # a file truncated to end inside a block
        await fs.setattr(fs.lookup(ROOT_INO, b"long").ino, size=39 * BS + 123)
        want[b"long"] = want[b"long"][: 39 * BS + 123]
        await fs.flush_all()
        await vol.sync()
        await vol.maybe_seal(force=True)
        assert await repl.wait_shipped(vol.journal.segno - 1, 60)
        assert vol.journal.segno > 4, "the files should span several segments"
    finally:
        await repl.stop()
        await vol.close()
    return want


@pytest.mark.parametrize("cached", [True, False], ids=["pread", "ranged-get"])
def test_stream_and_read_chunks_match_read(
    tmp_path: Path,
    seaweedfs: LocalProvider,
    monkeypatch: pytest.MonkeyPatch,
    cached: bool,
) -> None:
    cfg = Config.model_validate(
        {
            "volume": {"name": "rr", "state_dir": str(tmp_path / "state")},
            "targets": [target_for(seaweedfs, "sw").model_dump(mode="json")],
            "replication": {"checkpoint_every": 0},
        }
    )
    want = asyncio.run(_write_files(cfg))
    # Small runs and batches, so that runs split and batches chain.
    monkeypatch.setattr(ChunkReader, "RUN_SPAN", 3 * BS)
    monkeypatch.setattr(FileSystem, "STREAM_BATCH", 7 * BS)

    async def check() -> None:
        async with ObjectStore(cfg.targets[0]) as store:
            scratch = tmp_path / uuid.uuid4().hex
            cache = SegmentCache(scratch / "segments", 1 << 30 if cached else 1)
            rebuilt, keys = await rebuild(store, scratch, None, PointSpec(), cache)
            vol = RecoveredVolume(scratch, rebuilt, keys, store, cache)
            try:
                assert any(cache.dir.glob("*.seg")) == cached
                fs = FileSystem(vol)
                # The reader's careful path, which its batches fall back to: spied on.
                slow = vol.reader.read_chunk
                fallbacks: list[bytes] = []

                async def counted(cid: bytes) -> bytes:
                    fallbacks.append(cid)
                    return await slow(cid)

                vol.reader.read_chunk = counted  # type: ignore[method-assign]
                for name, data in want.items():
                    ino = fs.lookup(ROOT_INO, name).ino
                    pieces = [p async for p in fs.stream(ino)]
                    assert b"".join(pieces) == data, name
                    assert all(len(p) <= 7 * BS for p in pieces)
                    assert not fallbacks, "every chunk came by the batched path"
                    assert await fs.read(ino, 0, len(data) + 10) == data, name
                    blocks = vol.catalog.blocks(ino)
                    cids = [blocks[b][0] for b in sorted(blocks)]
                    vol.reader.read_chunk = slow  # type: ignore[method-assign]
                    one_by_one = [await slow(c) for c in cids]  # (a patch reads its base)
                    vol.reader.read_chunk = counted  # type: ignore[method-assign]
                    assert await vol.read_chunks(cids) == one_by_one
                    assert await vol.read_chunks(cids[::-1]) == one_by_one[::-1]
            finally:
                await vol.close()

    asyncio.run(check())
