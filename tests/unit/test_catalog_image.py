"""Checkpoint images and read-only catalogs: what a checkpoint holds, and what reads it.

A checkpoint is the catalog file as of one LSN, without what describes this
site (the watermarks, the epoch); recovery and GC read it back with the
catalog's own queries. A catalog read beside its writer never writes.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from tests.support.volume_helpers import file_ops
from vaultsync.engine.catalog import SCHEMA_VERSION, read_only
from vaultsync.engine.catalog_image import build_image, image_chunk_ids, image_schema
from vaultsync.engine.volume import Volume
from vaultsync.format.header import new_header
from vaultsync.format.state_layout import StateDir


async def _volume(state: Path, files: int) -> Volume:
    vol = await Volume.create(state, new_header("c", 64 * 1024, 3))
    for i in range(files):
        data = os.urandom(2000)
        prepared = await vol.prepare_chunks([data])
        await vol.commit(
            file_ops(100 + i, f"f{i}".encode(), [(prepared[0].id, len(data))]), prepared
        )
    return vol


async def test_an_image_is_the_volume_without_this_site(tmp_path: Path) -> None:
    state = tmp_path / "s"
    vol = await _volume(state, 5)
    try:
        vol.set_watermark("a", 1, vol.last_lsn)
        vol.commit_catalog()
        lsn, image = build_image(StateDir(state).catalog)
        assert lsn == vol.last_lsn
        path = tmp_path / "image.db"
        path.write_bytes(image)
        with read_only(path) as cat:
            assert cat.last_lsn() == lsn
            assert cat.watermarks() == {} and cat.get_meta("epoch") is None
            assert cat.counts(("inodes",)) == {"inodes": 6}
        assert image_chunk_ids(image) == vol.tree_chunks() and len(vol.tree_chunks()) == 5
        assert image_schema(path) == SCHEMA_VERSION
    finally:
        await vol.close()


async def test_an_image_leaves_out_what_is_not_committed(tmp_path: Path) -> None:
    """The image is read from the file: a batch the catalog has not committed is not in it
    (Volume.build_checkpoint commits first)."""
    state = tmp_path / "s"
    vol = await _volume(state, 1)
    try:
        vol.commit_catalog()
        before = vol.last_lsn
        data = os.urandom(100)
        prepared = await vol.prepare_chunks([data])
        vol.commit_nowait(file_ops(200, b"late", [(prepared[0].id, len(data))]), prepared)
        assert build_image(StateDir(state).catalog)[0] == before
        built = await vol.build_checkpoint()
        assert built is not None and built[0] == vol.last_lsn == before + 1
    finally:
        await vol.close()


def test_a_file_that_is_no_catalog_has_no_schema(tmp_path: Path) -> None:
    path = tmp_path / "image.db"
    path.write_bytes(b"not SQLite at all" * 100)
    assert image_schema(path) is None
    sqlite3.connect(tmp_path / "empty.db").close()
    assert image_schema(tmp_path / "empty.db") is None  # SQLite, but no meta table


async def test_a_read_only_catalog_sees_its_writer_and_never_writes(tmp_path: Path) -> None:
    state = tmp_path / "s"
    vol = await _volume(state, 3)
    try:
        vol.commit_catalog()
        with read_only(StateDir(state).catalog) as cat:
            assert cat.last_lsn() == vol.last_lsn
            assert [s.segno for s in cat.sealed_segments()] == [
                s.segno for s in vol.sealed_segments()
            ]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                cat.set_meta("epoch", 7)
    finally:
        await vol.close()
