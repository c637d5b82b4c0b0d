"""The SQLite catalog: the journal's transactions, applied and indexed.

The journal is the truth; the catalog is a materialised view of it that can be
queried. Invariants:

- `meta.last_lsn` is the newest transaction applied, and every transaction up
  to it is applied completely: each one is applied inside a savepoint of the
  open SQLite transaction, and `commit` writes `last_lsn` (and `max_ino`) in
  that same transaction just before it commits it.
- The catalog is never ahead of the journal: a transaction is applied only
  after its records were written to the journal (volume.py keeps this).
- A chunk is in `chunks` only if a committed transaction stored it, so a
  deduplicated write never points at a chunk that recovery could cut.
- A chunk stored as a patch names its `base` (docs/format.md §6.3); the base is
  a whole chunk and stays in `chunks` as long as the patch does (GC counts the
  bases of live patches as live: `referenced`, `patch_bases`).

The catalog is plain sqlite3 used from the event-loop thread, not aiosqlite
(which the first design named): a point query costs ~4 µs here against ~240 µs
through aiosqlite's thread hop, and metadata-heavy workloads (create, stat,
rename) are made of nothing but such queries. Every method is synchronous and
short; since nothing awaits between the statements of an update, no other
coroutine can observe or interleave with a half-applied transaction.
SQLite runs with synchronous=NORMAL: a power cut may lose the newest catalog
commits, which replay from the journal on the next open.

Every SQL statement of the product is in this module and in catalog_image.py
(the catalog as a checkpoint holds it); other code asks these methods. Other
processes read a catalog file through `read_only`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaultsync.engine.journal import Location
from vaultsync.errors import VolumeError
from vaultsync.format.segment import CHUNK_ID_SIZE, Record, patch_base
from vaultsync.format.txn import (
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

# 2: chunks.base (patch chunks). A version-1 catalog or checkpoint image is upgraded
# in place when opened (`_upgrade`); it holds no patches, so every base is NULL.
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)

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
-- A listing pages by id within one directory: without it each page sorts them all.
CREATE INDEX IF NOT EXISTS dirents_by_parent ON dirents(parent, id);
CREATE TABLE IF NOT EXISTS blocks(
    ino INTEGER NOT NULL, blockno INTEGER NOT NULL, chunk BLOB NOT NULL, length INTEGER NOT NULL,
    PRIMARY KEY(ino, blockno)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_chunk ON blocks(chunk);
CREATE TABLE IF NOT EXISTS xattrs(
    ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(ino, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks(
    id BLOB PRIMARY KEY, segno INTEGER NOT NULL, offset INTEGER NOT NULL,
    length INTEGER NOT NULL, lsn INTEGER NOT NULL, base BLOB) WITHOUT ROWID;
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
    base: bytes | None = None  # the chunk it patches, for a patch record

    @classmethod
    def of(cls, rec: Record, location: Location) -> StoredChunk:
        """The catalog row a CHUNK record makes, wherever it was read or written."""
        return cls(rec.payload[:CHUNK_ID_SIZE], location, rec.lsn, patch_base(rec))


@dataclass(frozen=True)
class SealedSegment:
    """A segment that takes no more records: what a shipper uploads whole."""

    segno: int
    first_lsn: int | None  # None: it holds no transaction
    last_lsn: int | None
    size: int
    sealed_ns: int | None


def _upgrade(db: sqlite3.Connection) -> None:
    """Bring a version-1 catalog (or checkpoint image) to this schema."""
    cols = [r[1] for r in db.execute("PRAGMA table_info(chunks)")]
    if cols and "base" not in cols:
        db.execute("ALTER TABLE chunks ADD COLUMN base BLOB")


class Catalog:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self._last_lsn = 0
        # The highest inode number ever used, kept even when that inode is gone, so
        # numbers are never reused across mounts (a stale kernel handle stays stale).
        self._max_ino = 0
        # Inodes as the applied transactions left them. Only apply() changes the inodes
        # table, and it updates this after its savepoint is released, so an entry here
        # always equals the row (a failed transaction changes neither).
        self._inodes: dict[int, Inode] = {}
        self._unsaved = False  # applied since the last commit wrote meta.last_lsn
        # Bumped by every operation that changes some file's block map: a reader that
        # saw the same value before and after an await knows no map changed meanwhile.
        self.blocks_gen = 0
        # The write SQLite refused (a full disk), after which this catalog applies and
        # commits nothing more. INVARIANT: meta.last_lsn never names a transaction the
        # catalog lacks, so the next open replays from the journal whatever was lost.
        self.failed: sqlite3.Error | None = None
        # ...and lost its uncommitted batch with it: what it answers is older than the
        # journal, so nothing may be read from it either.
        self.stale = False

    @classmethod
    def open(cls, path: Path, *, bulk: bool = False) -> Catalog:
        """Open (creating) the catalog at `path`.

        `bulk` is for a catalog rebuilt from scratch (recovery, promotion): nothing
        in it exists anywhere else yet, so a crash halfway loses nothing that the
        rebuild would not redo. It then runs with its rollback journal in memory
        and without fsync, which makes replaying many transactions several times
        cheaper; `end_bulk` turns it into a normal, durable catalog once at the end.
        """
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if bulk:
            db.execute("PRAGMA journal_mode=MEMORY")
            db.execute("PRAGMA synchronous=OFF")
        else:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=OFF")
        _upgrade(db)
        db.executescript(_SCHEMA)
        db.execute("CREATE INDEX IF NOT EXISTS chunks_by_base ON chunks(base) WHERE base NOT NULL")
        cat = cls(db)
        if cat.get_meta("schema_version") != SCHEMA_VERSION:
            cat.set_meta("schema_version", SCHEMA_VERSION)
        cat._last_lsn = int(cat.get_meta("last_lsn") or 0)
        cat._max_ino = int(cat.get_meta("max_ino") or 0)
        return cat

    def commit(self) -> None:
        """Make applied transactions visible to other processes and durable in SQLite.

        Transactions are applied inside one long SQLite transaction (a savepoint
        each, so one failing never takes the others with it) and committed here,
        by the mount's quarter-second timer, checkpoints, GC and close: a SQLite
        commit costs more than applying a whole transaction. Until then a crash loses them from the
        catalog only; the journal has them and replay restores them.
        """
        with self._writing():
            if self.db.in_transaction:
                if self._unsaved:
                    self.set_meta("last_lsn", self._last_lsn)
                    self.set_meta("max_ino", self._max_ino)
                self.db.execute("COMMIT")
                self._unsaved = False

    def _fail(self, e: sqlite3.Error) -> None:
        self.failed = e
        self.stale = self._unsaved and not self.db.in_transaction

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Around every catalog write: the stop at the first refusal (invariant above)."""
        self._check_failed()
        try:
            yield
        except sqlite3.Error as e:
            self._fail(e)
            raise

    def _check_failed(self) -> None:
        if self.failed is not None:
            raise VolumeError(
                f"the catalog could not be written ({self.failed}) and takes no more "
                "changes; remount to have it rebuilt from the journal"
            )

    def end_bulk(self, path: Path, durable: bool = True) -> None:
        """After a bulk rebuild: commit, switch to the normal WAL mode, and (if `durable`)
        make the file durable with one fsync of it and its directory, instead of one
        per commit. A throwaway catalog (a point-in-time mount, a restore) skips that."""
        self.commit()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        if not durable:
            return
        for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
            fd = os.open(target, flags)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        if self.failed is None:  # else its open batch may lack a transaction: dropped
            self.commit()
        self.db.close()

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self.db.execute(sql, args).fetchone()

    # -- meta --------------------------------------------------------------------
    def get_meta(self, key: str) -> Any:
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return None if row is None else row[0]

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            (key, value),
        )

    def last_lsn(self) -> int:
        return self._last_lsn

    # -- applying transactions ----------------------------------------------------
    def apply(self, lsn: int, txn: Transaction, chunks: Iterable[StoredChunk] = ()) -> None:
        """Apply one committed transaction atomically, with the chunks it stored."""
        if lsn <= self._last_lsn:
            return  # replay of something already applied: idempotent by design
        # Refused, the journal has this transaction and the catalog does not: applying any
        # later one would leave a hole that meta.last_lsn papers over (invariant above).
        with self._writing():
            self._apply(lsn, txn, list(chunks))

    def _apply(self, lsn: int, txn: Transaction, chunks: list[StoredChunk]) -> None:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("SAVEPOINT txn")
        try:
            if chunks:
                # REPLACE: a chunk stored again (moved by GC compaction, or written anew
                # after GC dropped it) lives where its newest record is.
                self.db.executemany(
                    "INSERT OR REPLACE INTO chunks(id, segno, offset, length, lsn, base) "
                    "VALUES(?, ?, ?, ?, ?, ?)",
                    [
                        (
                            c.id,
                            c.location.segno,
                            c.location.offset,
                            c.location.length,
                            c.lsn,
                            c.base,
                        )
                        for c in chunks
                    ],
                )
            top = self._max_ino
            for op in txn.ops:
                self._apply_op(op)
                if isinstance(op, SetInode) and op.ino > top:
                    top = op.ino
            self.db.execute("RELEASE txn")
            self._cache_inodes(txn)
        except BaseException:
            self.db.execute("ROLLBACK TO txn")
            self.db.execute("RELEASE txn")
            raise
        self._last_lsn = lsn
        self._max_ino = max(self._max_ino, top)
        self._unsaved = True  # meta.last_lsn is written at `commit`

    INODE_CACHE = 100_000

    def _cache_inodes(self, txn: Transaction) -> None:
        cache = self._inodes
        for op in txn.ops:
            if isinstance(op, SetInode):
                if len(cache) >= self.INODE_CACHE:
                    cache.clear()  # bounded; the hot set comes back at once
                cache[op.ino] = Inode(*op.row())
            elif isinstance(op, DropInode):
                cache.pop(op.ino, None)

    def _apply_op(self, op: Op) -> None:
        x = self.db.execute
        match op:
            case SetInode():
                x(
                    "INSERT OR REPLACE INTO inodes(ino, mode, uid, gid, size, nlink, rdev, "
                    "atime_ns, mtime_ns, ctime_ns, target) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                    op.row(),
                )
            case DropInode():
                self.blocks_gen += 1
                x("DELETE FROM inodes WHERE ino=?", (op.ino,))
                x("DELETE FROM blocks WHERE ino=?", (op.ino,))
                x("DELETE FROM xattrs WHERE ino=?", (op.ino,))
            case SetDirent():
                x(
                    "INSERT INTO dirents(parent, name, ino) VALUES(?,?,?) "
                    "ON CONFLICT(parent, name) DO UPDATE SET ino=excluded.ino",
                    (op.parent, op.name, op.ino),
                )
            case DropDirent():
                x("DELETE FROM dirents WHERE parent=? AND name=?", (op.parent, op.name))
            case SetBlocks():
                self.blocks_gen += 1
                holes = [(op.ino, b) for b, cid, _ in op.blocks if cid is None]
                sets = [
                    (op.ino, b, bytes.fromhex(cid), n) for b, cid, n in op.blocks if cid is not None
                ]
                if holes:
                    self.db.executemany("DELETE FROM blocks WHERE ino=? AND blockno=?", holes)
                if sets:
                    self.db.executemany(
                        "INSERT OR REPLACE INTO blocks(ino, blockno, chunk, length) "
                        "VALUES(?,?,?,?)",
                        sets,
                    )
            case TruncateBlocks():
                self.blocks_gen += 1
                x("DELETE FROM blocks WHERE ino=? AND blockno>=?", (op.ino, op.first))
            case SetXattr():
                if op.value is None:
                    x("DELETE FROM xattrs WHERE ino=? AND name=?", (op.ino, op.name))
                else:
                    x(
                        "INSERT OR REPLACE INTO xattrs(ino, name, value) VALUES(?,?,?)",
                        (op.ino, op.name, op.value),
                    )
            case _:
                raise TypeError(f"unknown operation {op!r}")

    # -- chunks and segments ---------------------------------------------------------
    def chunk_location(self, cid: bytes) -> Location | None:
        row = self._one("SELECT segno, offset, length FROM chunks WHERE id=?", (cid,))
        return None if row is None else Location(row[0], row[1], row[2])

    def chunk_base(self, cid: bytes) -> bytes | None:
        """The chunk `cid` patches, or None (a whole chunk, or not in the catalog)."""
        row = self._one("SELECT base FROM chunks WHERE id=?", (cid,))
        return None if row is None or row[0] is None else bytes(row[0])

    def patch_bases(self) -> list[tuple[bytes, bytes]]:
        """(patch id, base id) of every patch chunk: a base is live whenever its patch is."""
        rows = self.db.execute("SELECT id, base FROM chunks WHERE base NOT NULL")
        return [(bytes(r[0]), bytes(r[1])) for r in rows]

    def chunk_locations(self, ids: Iterable[bytes]) -> dict[bytes, Location]:
        """Where each of `ids` is stored (absent: not in the catalog), in few queries:
        a batched read costs one query per 500 chunks instead of one per chunk."""
        ids = list(ids)
        found: dict[bytes, Location] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = (
                "SELECT id, segno, offset, length FROM chunks "
                f"WHERE id IN ({','.join('?' * len(part))})"
            )
            for r in self.db.execute(q, part):
                found[bytes(r[0])] = Location(r[1], r[2], r[3])
        return found

    def known_chunks(self, ids: Iterable[bytes]) -> set[bytes]:
        ids = list(ids)
        found: set[bytes] = set()
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = f"SELECT id FROM chunks WHERE id IN ({','.join('?' * len(part))})"
            found.update(r[0] for r in self.db.execute(q, part))
        return found

    def chunks_in(self, segno: int) -> list[tuple[bytes, int, int]]:
        """(id, offset, length) of every chunk whose current copy is in segment `segno`."""
        rows = self.db.execute(
            "SELECT id, offset, length FROM chunks WHERE segno=? ORDER BY offset", (segno,)
        )
        return [(bytes(r[0]), int(r[1]), int(r[2])) for r in rows]

    def referenced(self, ids: Iterable[bytes]) -> set[bytes]:
        """Which of `ids` the current tree needs: a block refers to it, or to a patch of it."""
        ids = list(ids)
        found: set[bytes] = set()
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ",".join("?" * len(part))
            q = f"SELECT DISTINCT chunk FROM blocks WHERE chunk IN ({marks})"
            found.update(bytes(r[0]) for r in self.db.execute(q, part))
            q = (
                f"SELECT DISTINCT c.base FROM chunks c WHERE c.base IN ({marks}) "
                "AND EXISTS (SELECT 1 FROM blocks b WHERE b.chunk = c.id)"
            )
            found.update(bytes(r[0]) for r in self.db.execute(q, part))
        return found

    def tree_chunks(self) -> set[bytes]:
        """Every chunk a block of the current tree refers to (not the bases of patches)."""
        return {bytes(r[0]) for r in self.db.execute("SELECT DISTINCT chunk FROM blocks")}

    def drop_chunks(self, segno: int, ids: Iterable[bytes]) -> int:
        """Forget chunks GC found garbage, so no new write deduplicates against them."""
        with self._writing():
            if not self.db.in_transaction:
                self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.executemany(
                "DELETE FROM chunks WHERE id=? AND segno=?", [(i, segno) for i in ids]
            )
            return cur.rowcount

    def forget_segment(self, segno: int) -> None:
        """A segment GC deleted everywhere: it is no longer part of the journal."""
        with self._writing():
            if not self.db.in_transaction:
                self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM segments WHERE segno=?", (segno,))

    def note_segment(
        self,
        segno: int,
        size: int,
        first_lsn: int | None,
        last_lsn: int | None,
        sealed_ns: int | None,
    ) -> None:
        with self._writing():
            self.db.execute(
                "INSERT INTO segments(segno, first_lsn, last_lsn, size, sealed, sealed_ns) "
                "VALUES(?,?,?,?,?,?) ON CONFLICT(segno) DO UPDATE SET "
                "first_lsn=coalesce(segments.first_lsn, excluded.first_lsn), "
                "last_lsn=excluded.last_lsn, size=excluded.size, sealed=excluded.sealed, "
                "sealed_ns=excluded.sealed_ns",
                (segno, first_lsn, last_lsn, size, int(sealed_ns is not None), sealed_ns),
            )

    _SEALED = "SELECT segno, first_lsn, last_lsn, size, sealed_ns FROM segments WHERE sealed=1"

    def sealed_segment(self, segno: int) -> SealedSegment | None:
        row = self._one(f"{self._SEALED} AND segno=?", (segno,))
        return None if row is None else SealedSegment(*row)

    def sealed_segments(self) -> list[SealedSegment]:
        """Oldest first."""
        return [SealedSegment(*r) for r in self.db.execute(f"{self._SEALED} ORDER BY segno")]

    def segments(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT segno, first_lsn, last_lsn, size, sealed, sealed_ns "
            "FROM segments ORDER BY segno"
        ).fetchall()
        keys = ("segno", "first_lsn", "last_lsn", "size", "sealed", "sealed_ns")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def set_watermark(self, target: str, segno: int, lsn: int, now_ns: int) -> None:
        self.db.execute(
            "INSERT INTO watermarks(target, segno, lsn, updated_ns) VALUES(?,?,?,?) "
            "ON CONFLICT(target) DO UPDATE SET segno=excluded.segno, lsn=excluded.lsn, "
            "updated_ns=excluded.updated_ns",
            (target, segno, lsn, now_ns),
        )

    def watermarks(self) -> dict[str, tuple[int, int, int]]:
        rows = self.db.execute("SELECT target, segno, lsn, updated_ns FROM watermarks")
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    # -- namespace queries -------------------------------------------------------------
    def inode(self, ino: int) -> Inode | None:
        i = self._inodes.get(ino)
        if i is not None:
            return i
        row = self._one(
            "SELECT ino, mode, uid, gid, size, nlink, rdev, atime_ns, mtime_ns, ctime_ns, target "
            "FROM inodes WHERE ino=?",
            (ino,),
        )
        if row is None:
            return None
        i = Inode(*row)
        if len(self._inodes) >= self.INODE_CACHE:
            self._inodes.clear()
        self._inodes[ino] = i
        return i

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self._one("SELECT ino FROM dirents WHERE parent=? AND name=?", (parent, name))
        return None if row is None else int(row[0])

    def has_children(self, parent: int) -> bool:
        return self._one("SELECT 1 FROM dirents WHERE parent=? LIMIT 1", (parent,)) is not None

    def parent_of(self, ino: int) -> int | None:
        """A directory's parent (directories have exactly one entry naming them)."""
        row = self._one("SELECT parent FROM dirents WHERE ino=? LIMIT 1", (ino,))
        return None if row is None else int(row[0])

    def link_of(self, ino: int) -> tuple[int, bytes] | None:
        """(parent, name) of one entry naming `ino` (a file with hard links has several)."""
        row = self._one("SELECT parent, name FROM dirents WHERE ino=? LIMIT 1", (ino,))
        return None if row is None else (int(row[0]), bytes(row[1]))

    def listdir(
        self, parent: int, after_id: int = 0, limit: int = 1000
    ) -> list[tuple[Dirent, Inode]]:
        """Entries after `after_id`, each with its inode: one query for a page of a
        listing (readdirplus answers with every entry's attributes), not one per entry."""
        rows = self.db.execute(
            "SELECT d.id, d.name, i.ino, i.mode, i.uid, i.gid, i.size, i.nlink, i.rdev, "
            "i.atime_ns, i.mtime_ns, i.ctime_ns, i.target "
            "FROM dirents d JOIN inodes i ON i.ino = d.ino "
            "WHERE d.parent=? AND d.id>? ORDER BY d.id LIMIT ?",
            (parent, after_id, limit),
        )
        return [(Dirent(r[0], r[1], r[2]), Inode(*r[2:])) for r in rows]

    def blocks(self, ino: int) -> dict[int, tuple[bytes, int]]:
        rows = self.db.execute(
            "SELECT blockno, chunk, length FROM blocks WHERE ino=? ORDER BY blockno", (ino,)
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def block(self, ino: int, blockno: int) -> tuple[bytes, int] | None:
        row = self._one(
            "SELECT chunk, length FROM blocks WHERE ino=? AND blockno=?", (ino, blockno)
        )
        return None if row is None else (row[0], row[1])

    def block_range(self, ino: int, first: int, last: int) -> dict[int, tuple[bytes, int]]:
        rows = self.db.execute(
            "SELECT blockno, chunk, length FROM blocks WHERE ino=? AND blockno BETWEEN ? AND ?",
            (ino, first, last),
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        rows = self.db.execute("SELECT name, value FROM xattrs WHERE ino=?", (ino,))
        return {r[0]: r[1] for r in rows}

    def xattr(self, ino: int, name: bytes) -> bytes | None:
        row = self._one("SELECT value FROM xattrs WHERE ino=? AND name=?", (ino, name))
        return None if row is None else bytes(row[0])

    def max_ino(self) -> int:
        row = self._one("SELECT coalesce(max(ino), 0) FROM inodes")
        return max(int(row[0]) if row else 0, self._max_ino)

    def orphans(self) -> list[int]:
        """Inodes with no link left: open-but-unlinked files whose last close never came."""
        return [int(r[0]) for r in self.db.execute("SELECT ino FROM inodes WHERE nlink=0")]

    def usage(self) -> tuple[int, int]:
        """(bytes in chunks referenced, inode count) for statfs."""
        row = self._one("SELECT coalesce(sum(size), 0), count(*) FROM inodes")
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def counts(
        self, tables: Sequence[str] = ("inodes", "dirents", "blocks", "chunks", "segments")
    ) -> dict[str, int]:
        out = {}
        for table in tables:
            row = self._one(f"SELECT count(*) FROM {table}")
            out[table] = int(row[0]) if row else 0
        return out


# -- a catalog file read by others: beside its writer, or as a checkpoint image --------
@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Catalog]:
    """The catalog file at `path` for reading only: nothing is created or upgraded, and a
    write fails. WAL lets it sit beside a running mount (status, verify, snapshots), which
    it never disturbs: no recovery runs and the volume's lock is not taken."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    try:
        cat = Catalog(db)
        cat._last_lsn = int(cat.get_meta("last_lsn") or 0)
        cat._max_ino = int(cat.get_meta("max_ino") or 0)
        yield cat
    finally:
        db.close()
