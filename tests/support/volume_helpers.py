"""Shared by the volume and crash tests: build transactions, dump the catalog."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from vaultsync.format.state_layout import StateDir
from vaultsync.format.txn import ROOT_INO, Op, SetBlocks, SetDirent, SetInode


def file_ops(ino: int, name: bytes, chunks: list[tuple[bytes, int]]) -> list[Op]:
    """A new regular file in the root whose blocks point at the given chunks."""
    size = sum(n for _, n in chunks)
    return [
        SetInode(ino=ino, mode=stat.S_IFREG | 0o644, size=size, mtime_ns=ino),
        SetDirent(parent=ROOT_INO, name=name, ino=ino),
        SetBlocks(ino=ino, blocks=tuple((i, cid.hex(), n) for i, (cid, n) in enumerate(chunks))),
    ]


def dump_catalog(state_dir: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every namespace table, sorted, read with plain sqlite3 (independent of Catalog)."""
    db = sqlite3.connect(f"file:{StateDir(state_dir).catalog}?mode=ro", uri=True)
    try:
        out = {}
        for table, cols in (
            ("inodes", "*"),
            ("dirents", "parent, name, ino"),
            ("blocks", "*"),
            ("xattrs", "*"),
            ("chunks", "id"),
        ):
            out[table] = sorted(db.execute(f"SELECT {cols} FROM {table}").fetchall())
        out["last_lsn"] = db.execute("SELECT value FROM meta WHERE key='last_lsn'").fetchall()
        return out
    finally:
        db.close()
