"""The local volume: commit, reopen, replay, and repair after damage."""

from __future__ import annotations

import errno
import itertools
import os
import sqlite3
from pathlib import Path

import pyfuse3
import pytest

from tests.support.volume_helpers import dump_catalog, file_ops
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.volume import Volume
from vaultsync.errors import CorruptRecordError, VolumeError
from vaultsync.format.header import new_header
from vaultsync.format.state_layout import CATALOG, StateDir
from vaultsync.format.txn import ROOT_INO
from vaultsync.fuse.operations import Operations


async def make_volume(state: Path, passphrase: str | None = None, **kw: object) -> Volume:
    header = new_header("t", 64 * 1024, 3, passphrase)
    return await Volume.create(state, header, passphrase, **kw)  # type: ignore[arg-type]


async def write_files(vol: Volume, n: int, *, durable: bool = True) -> dict[int, bytes]:
    contents = {}
    for i in range(n):
        ino = 100 + i
        data = os.urandom(1000 + i) + b"shared-tail" * 10
        prepared = await vol.prepare_chunks([data])
        ops = file_ops(ino, f"f{i}".encode(), [(prepared[0].id, len(data))])
        await vol.commit(ops, prepared, durable=durable)
        contents[ino] = data
    return contents


async def read_file(vol: Volume, ino: int) -> bytes:
    blocks = vol.catalog.blocks(ino)
    return b"".join([await vol.read_chunk(cid) for _, (cid, _) in sorted(blocks.items())])


async def test_create_makes_root_and_refuses_to_overwrite(tmp_path: Path) -> None:
    vol = await make_volume(tmp_path / "s")
    root = vol.catalog.inode(ROOT_INO)
    assert root is not None and root.nlink == 2
    assert vol.last_lsn == 1
    await vol.close()
    with pytest.raises(VolumeError, match="already holds a volume"):
        await make_volume(tmp_path / "s")


@pytest.mark.parametrize("passphrase", [None, "correct horse"])
async def test_reopen_keeps_everything(tmp_path: Path, passphrase: str | None) -> None:
    state = tmp_path / "s"
    vol = await make_volume(state, passphrase)
    contents = await write_files(vol, 20)
    await vol.close()
    before = dump_catalog(state)
    vol = await Volume.open(state, passphrase)
    try:
        assert vol.replayed == 0 and vol.last_lsn == 21
        assert dump_catalog(state) == before
        for ino, data in contents.items():
            assert await read_file(vol, ino) == data
    finally:
        await vol.close()


async def test_identical_chunks_are_stored_once(tmp_path: Path) -> None:
    vol = await make_volume(tmp_path / "s")
    data = b"same" * 5000
    for i in range(3):
        p = await vol.prepare_chunks([data])
        await vol.commit(file_ops(10 + i, f"d{i}".encode(), [(p[0].id, len(data))]), p)
    counts = vol.catalog.counts()
    await vol.close()
    assert counts["chunks"] == 1 and counts["blocks"] == 3


async def test_lost_catalog_is_rebuilt_from_the_journal(tmp_path: Path) -> None:
    state = tmp_path / "s"
    vol = await make_volume(state, segment_size=16 * 1024)  # several sealed segments
    contents = await write_files(vol, 30)
    await vol.close()
    before = dump_catalog(state)
    for suffix in ("", "-wal", "-shm"):
        StateDir(state).catalog.with_name(CATALOG + suffix).unlink(missing_ok=True)
    vol = await Volume.open(state, segment_size=16 * 1024)
    try:
        assert vol.replayed == 31
        assert dump_catalog(state) == before
        for ino, data in contents.items():
            assert await read_file(vol, ino) == data
    finally:
        await vol.close()


async def test_torn_tail_is_cut_and_committed_work_survives(tmp_path: Path) -> None:
    state = tmp_path / "s"
    vol = await make_volume(state)
    contents = await write_files(vol, 5)
    await vol.close()
    before = dump_catalog(state)
    newest = sorted(StateDir(state).journal.glob("*.seg"))[-1]
    size = newest.stat().st_size
    with newest.open("ab") as f:
        f.write(b"\x01torn record that never finished" * 3)
    vol = await Volume.open(state)
    try:
        assert vol.recovery.cut_bytes == 96
        assert newest.stat().st_size == size
        assert dump_catalog(state) == before
        assert await read_file(vol, 104) == contents[104]
        # And the volume keeps working after the repair.
        more = await write_files(vol, 1)
        assert vol.last_lsn == 7 and more
    finally:
        await vol.close()


async def test_catalog_ahead_of_journal_is_refused_without_cutting(tmp_path: Path) -> None:
    state = tmp_path / "s"
    vol = await make_volume(state)
    await write_files(vol, 5)
    await vol.close()
    newest = sorted(StateDir(state).journal.glob("*.seg"))[-1]
    # Damage that is not a crash: the journal lost transactions the catalog applied.
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) - 200])
    damaged = newest.read_bytes()
    with pytest.raises(CorruptRecordError, match="catalog has applied LSN 6"):
        await Volume.open(state)
    assert newest.read_bytes() == damaged  # refusing must not make it worse


async def _new_file(vol: Volume, ino: int) -> bytes:
    data = os.urandom(3000)
    prepared = await vol.prepare_chunks([data])
    await vol.commit(file_ops(ino, b"f%d" % ino, [(prepared[0].id, len(data))]), prepared, True)
    return data


async def test_a_catalog_that_cannot_be_written_stops_the_volume_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite out of space may roll back the catalog's open batch. Applying anything after
    that would commit a meta.last_lsn past transactions the catalog lost, and the next
    open would never replay them: acknowledged files gone for good."""
    state = tmp_path / "s"
    vol = await make_volume(state)
    contents = {ino: await _new_file(vol, ino) for ino in (100, 101)}
    vol.catalog.commit()
    contents |= {ino: await _new_file(vol, ino) for ino in (102, 103)}  # fsynced, batch open

    def disk_full(*args: object) -> None:
        vol.catalog.db.execute("ROLLBACK")  # what SQLite may do on SQLITE_FULL
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(vol.catalog, "_apply", disk_full)
    with pytest.raises(VolumeError, match="could not be written"):
        await _new_file(vol, 104)
    monkeypatch.undo()
    assert vol.read_only and vol.catalog.stale and vol.catalog_stale
    # Nothing is answered from it now: a FUSE request is refused before it is read.
    with pytest.raises(pyfuse3.FUSEError) as refused:
        await Operations(FileSystem(vol)).getattr(ROOT_INO)
    assert refused.value.errno == errno.EIO
    with pytest.raises(VolumeError):
        await _new_file(vol, 105)
    with pytest.raises(VolumeError):
        vol.catalog.commit()
    await vol.close()
    vol = await Volume.open(state)
    try:
        for ino, data in contents.items():
            assert await read_file(vol, ino) == data
        assert vol.catalog.inode(104) is not None  # in the journal before SQLite refused
        assert vol.catalog.inode(105) is None  # refused before the journal took it
        await _new_file(vol, 106)
    finally:
        await vol.close()


async def test_a_refused_catalog_write_outside_a_transaction_stops_writes_too(
    tmp_path: Path,
) -> None:
    """GC writes the catalog directly (dropping garbage chunks): a refusal there stops the
    volume before the journal takes anything more."""
    vol = await make_volume(tmp_path / "s")
    await _new_file(vol, 100)
    real = vol.catalog.db

    class Refusing:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def executemany(self, *args: object) -> None:
            raise sqlite3.OperationalError("database or disk is full")

    vol.catalog.db = Refusing()  # type: ignore[assignment]
    with pytest.raises(sqlite3.Error):
        vol.catalog.drop_chunks(1, [bytes(32)])
    vol.catalog.db = real
    journal = vol.journal.size
    with pytest.raises(VolumeError, match="could not be written"):
        await _new_file(vol, 101)
    assert vol.read_only and vol.journal.size == journal
    await vol.close()
    vol = await Volume.open(tmp_path / "s")
    try:
        assert vol.catalog.inode(100) is not None and vol.catalog.inode(101) is None
    finally:
        await vol.close()


async def test_wrong_passphrase_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s"
    vol = await make_volume(state, "right one")
    await vol.close()
    with pytest.raises(Exception, match="passphrase"):
        await Volume.open(state, "wrong one")


async def test_sealing_records_segments(tmp_path: Path) -> None:
    state = tmp_path / "s"
    vol = await make_volume(state, segment_size=8 * 1024)
    await write_files(vol, 20)
    segs = vol.catalog.segments()
    await vol.close()
    sealed = [s for s in segs if s["sealed"]]
    assert len(sealed) >= 2
    # Sealed segments cover consecutive LSN ranges with no gap or overlap.
    for a, b in itertools.pairwise(sealed):
        assert b["first_lsn"] == a["last_lsn"] + 1
    files = sorted(StateDir(state).journal.glob("*.seg"))
    assert len(files) == len(sealed) + 1
