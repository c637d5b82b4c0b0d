"""The volume as replication, GC and salvage see it (engine/replicated.py).

What they may ask of the journal and the catalog, through Volume's methods:
the invariants stated there, kept here without a server.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.support.volume_helpers import file_ops
from vaultsync.engine.catalog_image import image_chunk_ids
from vaultsync.engine.replicated import ReplicatedVolume
from vaultsync.engine.volume import Volume
from vaultsync.format import segment as seg
from vaultsync.format.header import new_header
from vaultsync.format.patch import PatchPlan
from vaultsync.format.txn import ROOT_INO, DropDirent, SetDirent, SetInode

BS = 64 * 1024


async def _volume(state: Path) -> Volume:
    return await Volume.create(state, new_header("r", BS, 3))


async def _chunk(vol: Volume, data: bytes, plan: PatchPlan | None = None) -> bytes:
    prepared = await vol.prepare_chunks([data], [plan])
    vol.commit_nowait([], prepared)
    return prepared[0].id


async def test_garbage_is_what_the_tree_needs_neither_directly_nor_through_a_patch(
    tmp_path: Path,
) -> None:
    vol = await _volume(tmp_path / "s")
    try:
        base_data = os.urandom(BS)
        base = await _chunk(vol, base_data)
        patch = await _chunk(
            vol, base_data[:100] + b"p" * 100 + base_data[200:], PatchPlan(base, BS, ((100, 100),))
        )
        kept, gone = await _chunk(vol, os.urandom(BS)), await _chunk(vol, os.urandom(BS))
        vol.commit_nowait(
            [
                *file_ops(100, b"a", [(patch, BS)]),  # the base is live through its patch
                *file_ops(101, b"b", [(kept, BS)]),
            ]
        )
        assert vol.patch_bases() == [(patch, base)]
        assert vol.tree_chunks() == {patch, kept}
        segno = vol.journal_pos[0]
        assert {c for c, _o, _n in vol.chunks_in(segno)} == {base, patch, kept, gone}
        assert vol.drop_garbage(segno, [base, patch, kept, gone]) == 1
        assert vol.chunk_location(gone) is None
        assert all(vol.chunk_location(c) is not None for c in (base, patch, kept))
    finally:
        await vol.close()


async def test_a_path_is_found_from_the_inode_up(tmp_path: Path) -> None:
    vol = await _volume(tmp_path / "s")
    try:
        d = stat.S_IFDIR | 0o755
        vol.commit_nowait(
            [
                SetInode(ino=10, mode=d, nlink=2),
                SetDirent(parent=ROOT_INO, name=b"dir", ino=10),
                *file_ops(11, b"x", []),
                SetDirent(parent=10, name=b"f\xff", ino=11),
                DropDirent(parent=ROOT_INO, name=b"x"),
            ]
        )
        assert vol.path_of(11) == [b"dir", b"f\xff"]
        assert vol.path_of(ROOT_INO) == []
        vol.commit_nowait([DropDirent(parent=10, name=b"f\xff")])
        assert vol.path_of(11) is None
    finally:
        await vol.close()


async def test_transactions_after_an_lsn_come_from_the_journal(tmp_path: Path) -> None:
    vol = await _volume(tmp_path / "s")
    try:
        first = vol.last_lsn
        for ino in (20, 21, 22):
            vol.commit_nowait([SetInode(ino=ino, mode=stat.S_IFREG | 0o644)])
        await vol.sync()
        txns = list(vol.transactions_after(first + 1))
        assert [op.ino for t in txns for op in t.ops if isinstance(op, SetInode)] == [21, 22]
    finally:
        await vol.close()


async def test_the_checkpoint_mark_never_goes_back(tmp_path: Path) -> None:
    vol = await _volume(tmp_path / "s")
    try:
        assert vol.checkpoint_lsn == 0
        assert vol.advance_checkpoint_lsn(5) and vol.checkpoint_lsn == 5
        assert not vol.advance_checkpoint_lsn(5)
        assert not vol.advance_checkpoint_lsn(3) and vol.checkpoint_lsn == 5
    finally:
        await vol.close()


async def test_a_checkpoint_reads_back_as_the_tree(tmp_path: Path) -> None:
    vol = await _volume(tmp_path / "s")
    seen: ReplicatedVolume = vol  # what replication is handed: mypy checks Volume is one
    try:
        cid = await _chunk(vol, os.urandom(BS))
        vol.commit_nowait(file_ops(30, b"c", [(cid, BS)]))
        built = await seen.build_checkpoint()
        assert built is not None
        lsn, _when, body = built
        rec = seg.decode_record(body, "checkpoint")
        assert rec.lsn == lsn == seen.last_lsn
        assert image_chunk_ids(seen.decode_checkpoint(rec)) == {cid}
    finally:
        await vol.close()
