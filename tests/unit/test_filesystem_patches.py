"""Small rewrites stored as patches (docs/format.md §6.3), through FileSystem on a Volume.

What must hold: a 4 KiB rewrite of a 64 KiB block costs about 4 KiB of journal,
not 64; a patch's base is always a whole chunk; every file reads back exactly
as written, live, after a reopen (replay of the journal) and through the
catalog lost and rebuilt; a volume of format version 1 never gets a patch.
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from vaultsync.engine.catalog import Catalog
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.volume import Volume
from vaultsync.format.header import new_header
from vaultsync.format.patch import PatchPlan
from vaultsync.format.state_layout import CATALOG, StateDir
from vaultsync.format.txn import ROOT_INO

KiB = 1024
BS = 64 * KiB


def _journal_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in StateDir(state).journal.glob("*.seg"))


def _patch_rows(state: Path) -> list[tuple[bytes, bytes]]:
    cat = Catalog.open(StateDir(state).catalog)
    try:
        return cat.patch_bases()
    finally:
        cat.close()


async def _file(fs: FileSystem, name: bytes, data: bytes) -> int:
    ino = fs.mknod(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0, 0).ino
    fs.open(ino)
    await fs.write(ino, 0, data)
    await fs.fsync(ino)
    return ino


async def _read_all(fs: FileSystem, ino: int) -> bytes:
    fs.cache = type(fs.cache)(fs.cache.limit)  # from the journal, not the decoded cache
    return await fs.read(ino, 0, fs.getattr(ino).size)


@pytest.mark.parametrize("passphrase", [None, "pw"])
async def test_small_rewrites_are_patches_and_read_back(tmp_path: Path, passphrase: str) -> None:
    state = tmp_path / "state"
    vol = await Volume.create(state, new_header("p", BS, 3, passphrase), passphrase)
    fs = FileSystem(vol)
    rng = random.Random(5)
    model = bytearray(rng.randbytes(4 * BS))  # random: nothing compresses
    ino = await _file(fs, b"f", bytes(model))
    before = _journal_bytes(state)
    rewrites = 40
    for _ in range(rewrites):
        off = rng.randrange(len(model) - 4 * KiB)
        data = rng.randbytes(4 * KiB)
        model[off : off + len(data)] = data
        await fs.write(ino, off, data)
        await fs.fsync(ino)
        assert await fs.read(ino, off - off % BS, BS) == model[off - off % BS :][:BS]
    grown = _journal_bytes(state) - before
    # Whole blocks would be 40 x 64 KiB; patches stay a few KiB each (a block hit again
    # patches its base with both writes' ranges, and goes whole past a quarter of it).
    assert grown < rewrites * 20 * KiB, grown
    vol.catalog.commit()
    rows = _patch_rows(state)
    assert rows, "no rewrite was stored as a patch"
    patches = {pid for pid, _ in rows}
    assert not {base for _, base in rows} & patches, "a patch's base is itself a patch"
    assert await _read_all(fs, ino) == model

    # Truncating inside a block keeps the block's head as a patch of no bytes at all.
    await fs.setattr(ino, size=BS + 1000)
    del model[BS + 1000 :]
    assert await _read_all(fs, ino) == model
    await fs.release(ino)
    vol.catalog.commit()
    rows = _patch_rows(state)
    await vol.close()

    # Reopened: the journal is replayed into the catalog (patches with their bases).
    StateDir(state).catalog.unlink()
    for extra in ("-wal", "-shm"):
        StateDir(state).catalog.with_name(CATALOG + extra).unlink(missing_ok=True)
    vol = await Volume.open(state, passphrase)
    try:
        assert sorted(_patch_rows(state)) == sorted(rows)
        fs = FileSystem(vol)
        assert await _read_all(fs, ino) == model
    finally:
        await vol.close()


async def test_random_writes_over_uncached_blocks_read_nothing_until_needed(
    tmp_path: Path,
) -> None:
    """A partial write into a stored block whose chunk is not in memory is taken without
    reading it; a read, or the flush, reads the chunks (several in one trip) and puts them
    under the writes; the result reads back as written and is stored as patches."""
    state = tmp_path / "state"
    vol = await Volume.create(state, new_header("p", BS, 3), None)
    fs = FileSystem(vol)
    rng = random.Random(7)
    model = bytearray(rng.randbytes(8 * BS))
    ino = await _file(fs, b"f", bytes(model))
    fs.cache = type(fs.cache)(fs.cache.limit)  # nothing of the file in memory
    trips: list[int] = []
    real = vol.read_chunks

    async def counted(cids: list[bytes]) -> list[bytes]:
        trips.append(len(cids))
        return await real(cids)

    vol.read_chunks = counted  # type: ignore[method-assign,assignment]
    for b in (1, 3, 5, 6):
        for _ in range(3):  # several writes into each, a few bytes to a few KiB
            off = b * BS + rng.randrange(BS - 5000)
            data = rng.randbytes(rng.randint(1, 5000))
            model[off : off + len(data)] = data
            await fs.write(ino, off, data)
    assert trips == [], "a write read its block's stored chunk"
    assert sorted(fs.files[ino].unloaded) == [1, 3, 5, 6]
    # A read of one block brings in that one, under its writes.
    assert await fs.read(ino, 3 * BS, BS) == model[3 * BS : 4 * BS]
    assert trips == [1] and sorted(fs.files[ino].unloaded) == [1, 5, 6]
    # The flush brings in the other three in one trip, and stores patches.
    await fs.fsync(ino)
    assert trips == [1, 3]
    assert not fs.files[ino].unloaded
    vol.catalog.commit()
    assert len(_patch_rows(state)) == 4, "the rewritten blocks were not stored as patches"
    assert await _read_all(fs, ino) == model
    await vol.close()


async def _version_1(state: Path, data: bytes) -> tuple[Volume, FileSystem, int]:
    """A volume as vaultsync wrote them before patches, holding one file of `data`."""
    vol = await Volume.create(state, replace(new_header("p", BS, 3), format_version=1))
    fs = FileSystem(vol)
    return vol, fs, await _file(fs, b"f", data)


async def test_a_version_1_volume_gets_no_patches(tmp_path: Path) -> None:
    state = tmp_path / "state"
    vol, fs, ino = await _version_1(state, os.urandom(2 * BS))
    for off in range(0, 2 * BS, 8 * KiB):
        await fs.write(ino, off, b"x" * 100)
        await fs.fsync(ino)
    vol.catalog.commit()
    assert _patch_rows(state) == []
    await fs.release(ino)
    await vol.close()


async def test_a_patch_whose_base_went_is_stored_whole(tmp_path: Path) -> None:
    """The base was dropped between planning and commit (GC): the block goes whole."""
    state = tmp_path / "state"
    vol = await Volume.create(state, new_header("p", BS, 3))
    try:
        base = os.urandom(BS)
        block = base[:100] + b"y" * 100 + base[200:]
        plan = PatchPlan(vol.codec.chunk_id(base), BS, ((100, 100),))  # never stored
        prepared = await vol.prepare_chunks([block], [plan])
        assert prepared[0].base is not None
        vol.commit_nowait([], prepared)
        vol.catalog.commit()
        assert _patch_rows(state) == []
        assert await vol.read_chunk(prepared[0].id) == block
    finally:
        await vol.close()


async def test_a_version_1_catalog_is_upgraded_when_opened(tmp_path: Path) -> None:
    """A state directory (or checkpoint image) from before patches: chunks has no base."""
    state = tmp_path / "state"
    data = os.urandom(BS + 10)
    vol, fs, ino = await _version_1(state, data)
    await fs.release(ino)
    await vol.close()
    db = sqlite3.connect(StateDir(state).catalog)
    db.execute("DROP INDEX chunks_by_base")
    db.execute("ALTER TABLE chunks DROP COLUMN base")
    db.execute("UPDATE meta SET value=1 WHERE key='schema_version'")
    db.commit()
    db.close()
    vol = await Volume.open(state)
    try:
        assert vol.catalog.get_meta("schema_version") == 2
        assert vol.catalog.patch_bases() == []
        assert await FileSystem(vol).read(ino, 0, len(data) + 1) == data
    finally:
        await vol.close()
