"""The SQLite catalog: the journal's transactions, applied and indexed.

The journal is the truth; the catalog is a materialised view of it that can be
queried. Invariants:

- `meta.last_lsn` is the newest transaction applied, and every transaction up
  to it is applied completely: each one is applied inside a single SQLite
  transaction together with the new `last_lsn`.
- The catalog is never ahead of the journal: a transaction is applied only
  after its records were written to the journal (volume.py keeps this).
- A chunk is in `chunks` only if a committed transaction stored it, so a
  deduplicated write never points at a chunk that recovery could cut.

aiosqlite runs statements on its own thread and awaits each one, so other
coroutines run between the statements of one update; `_lock` serialises the
multi-statement updates and `BEGIN IMMEDIATE` makes each one atomic on disk.
SQLite runs with synchronous=NORMAL: a power cut may lose the newest catalog
commits, which replay from the journal on the next open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from vaultsync.journal import Location
from vaultsync.txn import (
    DropDirent,
    DropInode,
    Op,
    SetBlocks,
    SetDirent,
    SetInode,
    SetXattr,
    Transaction,
    TruncateBlocks,
)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inodes(
    ino INTEGER PRIMARY KEY, mode INTEGER NOT NULL, uid INTEGER NOT NULL, gid INTEGER NOT NULL,
    size INTEGER NOT NULL, nlink INTEGER NOT NULL, rdev INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    target BLOB);
-- id gives readdir stable offsets: it survives an entry being repointed.
CREATE TABLE IF NOT EXISTS dirents(
    id INTEGER PRIMARY KEY AUTOINCREMENT, parent INTEGER NOT NULL, name BLOB NOT NULL,
    ino INTEGER NOT NULL, UNIQUE(parent, name));
CREATE INDEX IF NOT EXISTS dirents_by_ino ON dirents(ino);
CREATE TABLE IF NOT EXISTS blocks(
    ino INTEGER NOT NULL, blockno INTEGER NOT NULL, chunk BLOB NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY(ino, blockno)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_chunk ON blocks(chunk);
CREATE TABLE IF NOT EXISTS xattrs(
    ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(ino, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks(
    id BLOB PRIMARY KEY, segno INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, lsn INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segments(
    segno INTEGER PRIMARY KEY, first_lsn INTEGER, last_lsn INTEGER, size INTEGER NOT NULL,
    sealed INTEGER NOT NULL DEFAULT 0, sealed_ns INTEGER);
CREATE TABLE IF NOT EXISTS watermarks(
    target TEXT PRIMARY KEY, segno INTEGER NOT NULL, lsn INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    target: bytes | None


@dataclass(frozen=True)
class Dirent:
    id: int
    name: bytes
    ino: int


@dataclass(frozen=True)
class StoredChunk:
    """A chunk record written to the journal in the transaction being committed."""

    id: bytes
    location: Location
    lsn: int


class Catalog:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Catalog:
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=OFF")
        await db.executescript(_SCHEMA)
        cat = cls(db)
        if await cat.get_meta("schema_version") is None:
            await cat.set_meta("schema_version", SCHEMA_VERSION)
        return cat

    async def close(self) -> None:
        await self.db.close()

    # -- meta --------------------------------------------------------------------
    async def get_meta(self, key: str) -> Any:
        async with self.db.execute("SELECT value FROM meta WHERE key=?", (key,)) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def set_meta(self, key: str, value: Any) -> None:
        async with self._lock:
            await self.db.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    async def last_lsn(self) -> int:
        v = await self.get_meta("last_lsn")
        return int(v or 0)

    # -- applying transactions ----------------------------------------------------
    async def apply(self, lsn: int, txn: Transaction, chunks: Iterable[StoredChunk] = ()) -> None:
        """Apply one committed transaction atomically, with the chunks it stored."""
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                current = await self.last_lsn()
                if lsn <= current:
                    # Replay of something already applied: idempotent by design, skip the work.
                    await self.db.execute("ROLLBACK")
                    return
                await self.db.executemany(
                    "INSERT OR IGNORE INTO chunks(id, segno, offset, length, lsn) "
                    "VALUES(?, ?, ?, ?, ?)",
                    [
                        (c.id, c.location.segno, c.location.offset, c.location.length, c.lsn)
                        for c in chunks
                    ],
                )
                for op in txn.ops:
                    await self._apply_op(op)
                await self.db.execute(
                    "INSERT INTO meta(key, value) VALUES('last_lsn', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (lsn,),
                )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise

    async def _apply_op(self, op: Op) -> None:
        x = self.db.execute
        match op:
            case SetInode():
                await x(
                    "INSERT OR REPLACE INTO inodes(ino, mode, uid, gid, size, nlink, rdev, "
                    "atime_ns, mtime_ns, ctime_ns, target) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        op.ino,
                        op.mode,
                        op.uid,
                        op.gid,
                        op.size,
                        op.nlink,
                        op.rdev,
                        op.atime_ns,
                        op.mtime_ns,
                        op.ctime_ns,
                        op.target,
                    ),
                )
            case DropInode():
                await x("DELETE FROM inodes WHERE ino=?", (op.ino,))
                await x("DELETE FROM blocks WHERE ino=?", (op.ino,))
                await x("DELETE FROM xattrs WHERE ino=?", (op.ino,))
            case SetDirent():
                await x(
                    "INSERT INTO dirents(parent, name, ino) VALUES(?,?,?) "
                    "ON CONFLICT(parent, name) DO UPDATE SET ino=excluded.ino",
                    (op.parent, op.name, op.ino),
                )
            case DropDirent():
                await x("DELETE FROM dirents WHERE parent=? AND name=?", (op.parent, op.name))
            case SetBlocks():
                holes = [(op.ino, b) for b, cid, _ in op.blocks if cid is None]
                sets = [
                    (op.ino, b, bytes.fromhex(cid), n) for b, cid, n in op.blocks if cid is not None
                ]
                if holes:
                    await self.db.executemany("DELETE FROM blocks WHERE ino=? AND blockno=?", holes)
                if sets:
                    await self.db.executemany(
                        "INSERT OR REPLACE INTO blocks(ino, blockno, chunk, length) "
                        "VALUES(?,?,?,?)",
                        sets,
                    )
            case TruncateBlocks():
                await x("DELETE FROM blocks WHERE ino=? AND blockno>=?", (op.ino, op.first))
            case SetXattr():
                if op.value is None:
                    await x("DELETE FROM xattrs WHERE ino=? AND name=?", (op.ino, op.name))
                else:
                    await x(
                        "INSERT OR REPLACE INTO xattrs(ino, name, value) VALUES(?,?,?)",
                        (op.ino, op.name, op.value),
                    )
            case _:
                raise TypeError(f"unknown operation {op!r}")

    # -- chunks and segments ---------------------------------------------------------
    async def chunk_location(self, cid: bytes) -> Location | None:
        async with self.db.execute(
            "SELECT segno, offset, length FROM chunks WHERE id=?", (cid,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else Location(row[0], row[1], row[2])

    async def known_chunks(self, ids: Iterable[bytes]) -> set[bytes]:
        ids = list(ids)
        found: set[bytes] = set()
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = f"SELECT id FROM chunks WHERE id IN ({','.join('?' * len(part))})"
            async with self.db.execute(q, part) as cur:
                found.update(r[0] for r in await cur.fetchall())
        return found

    async def note_segment(
        self,
        segno: int,
        size: int,
        first_lsn: int | None,
        last_lsn: int | None,
        sealed_ns: int | None,
    ) -> None:
        async with self._lock:
            await self.db.execute(
                "INSERT INTO segments(segno, first_lsn, last_lsn, size, sealed, sealed_ns) "
                "VALUES(?,?,?,?,?,?) ON CONFLICT(segno) DO UPDATE SET "
                "first_lsn=coalesce(segments.first_lsn, excluded.first_lsn), "
                "last_lsn=excluded.last_lsn, size=excluded.size, sealed=excluded.sealed, "
                "sealed_ns=excluded.sealed_ns",
                (segno, first_lsn, last_lsn, size, int(sealed_ns is not None), sealed_ns),
            )

    async def segments(self) -> list[dict[str, Any]]:
        async with self.db.execute(
            "SELECT segno, first_lsn, last_lsn, size, sealed, sealed_ns "
            "FROM segments ORDER BY segno"
        ) as cur:
            rows = await cur.fetchall()
        keys = ("segno", "first_lsn", "last_lsn", "size", "sealed", "sealed_ns")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def set_watermark(self, target: str, segno: int, lsn: int, now_ns: int) -> None:
        async with self._lock:
            await self.db.execute(
                "INSERT INTO watermarks(target, segno, lsn, updated_ns) VALUES(?,?,?,?) "
                "ON CONFLICT(target) DO UPDATE SET segno=excluded.segno, lsn=excluded.lsn, "
                "updated_ns=excluded.updated_ns",
                (target, segno, lsn, now_ns),
            )

    async def watermarks(self) -> dict[str, tuple[int, int, int]]:
        async with self.db.execute("SELECT target, segno, lsn, updated_ns FROM watermarks") as cur:
            return {r[0]: (r[1], r[2], r[3]) for r in await cur.fetchall()}

    # -- namespace queries -------------------------------------------------------------
    async def inode(self, ino: int) -> Inode | None:
        async with self.db.execute(
            "SELECT ino, mode, uid, gid, size, nlink, rdev, atime_ns, mtime_ns, ctime_ns, target "
            "FROM inodes WHERE ino=?",
            (ino,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else Inode(*row)

    async def lookup(self, parent: int, name: bytes) -> int | None:
        async with self.db.execute(
            "SELECT ino FROM dirents WHERE parent=? AND name=?", (parent, name)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def listdir(self, parent: int, after_id: int = 0, limit: int = 1000) -> list[Dirent]:
        async with self.db.execute(
            "SELECT id, name, ino FROM dirents WHERE parent=? AND id>? ORDER BY id LIMIT ?",
            (parent, after_id, limit),
        ) as cur:
            return [Dirent(*r) for r in await cur.fetchall()]

    async def blocks(self, ino: int) -> dict[int, tuple[bytes, int]]:
        async with self.db.execute(
            "SELECT blockno, chunk, length FROM blocks WHERE ino=? ORDER BY blockno", (ino,)
        ) as cur:
            return {r[0]: (r[1], r[2]) for r in await cur.fetchall()}

    async def xattrs(self, ino: int) -> dict[bytes, bytes]:
        async with self.db.execute("SELECT name, value FROM xattrs WHERE ino=?", (ino,)) as cur:
            return {r[0]: r[1] for r in await cur.fetchall()}

    async def max_ino(self) -> int:
        async with self.db.execute("SELECT coalesce(max(ino), 0) FROM inodes") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def counts(self) -> dict[str, int]:
        out = {}
        for table in ("inodes", "dirents", "blocks", "chunks", "segments"):
            async with self.db.execute(f"SELECT count(*) FROM {table}") as cur:
                row = await cur.fetchone()
            out[table] = int(row[0]) if row else 0
        return out
