"""Metadata transactions: the catalog changes that one LSN commits.

Every operation states the new value rather than a delta ("inode 7 is now
this", "block 3 of inode 7 is now chunk X"), so applying a transaction twice
gives the same catalog as applying it once. Crash recovery relies on that: it
replays the journal from the catalog's last LSN without asking which of the
transaction's statements already landed.

The JSON shape is part of the bucket format (docs/format.md); byte strings
(names, symlink targets, xattrs) are a JSON string when they are valid UTF-8
and {"b64": "..."} otherwise, so any name Linux allows survives.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from vaultsync.errors import CorruptRecordError, NewerFormatError

# The root directory's inode: created by the volume's first transaction.
ROOT_INO = 1


def enc_bytes(b: bytes) -> str | dict[str, str]:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return {"b64": base64.b64encode(b).decode()}


def dec_bytes(v: Any) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, dict) and isinstance(v.get("b64"), str):
        return base64.b64decode(v["b64"], validate=True)
    raise ValueError(f"not an encoded byte string: {v!r}")


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class Op:
    """Base of all operations; `kind` is the "op" field in JSON."""

    kind: ClassVar[str] = ""
    _bytes_fields: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        # Field by field, not dataclasses.asdict: that deep-copies, and this runs for
        # every operation of every transaction (a third of a create's encoding time).
        d: dict[str, Any] = {"op": self.kind}
        for k in _field_names(type(self)):  # type: ignore[arg-type]
            v = getattr(self, k)
            if v is not None and k in self._bytes_fields:
                v = enc_bytes(v)
            d[k] = v
        return d


@dataclass(frozen=True)
class SetInode(Op):
    """Create or replace an inode's attributes (all of them)."""

    kind: ClassVar[str] = "inode"
    _bytes_fields: ClassVar[tuple[str, ...]] = ("target",)
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    nlink: int = 1
    rdev: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    target: bytes | None = None  # symlink target

    def row(self) -> tuple[int, int, int, int, int, int, int, int, int, int, bytes | None]:
        """The attributes in the catalog's column order (that of catalog.Inode): one
        tuple serves the INSERT and the inode cache alike."""
        return (
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.size,
            self.nlink,
            self.rdev,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.target,
        )


@dataclass(frozen=True)
class DropInode(Op):
    """Forget an inode with its block map and xattrs (its last link and open handle are gone)."""

    kind: ClassVar[str] = "drop_inode"
    ino: int


@dataclass(frozen=True)
class SetDirent(Op):
    kind: ClassVar[str] = "dirent"
    _bytes_fields: ClassVar[tuple[str, ...]] = ("name",)
    parent: int
    name: bytes
    ino: int


@dataclass(frozen=True)
class DropDirent(Op):
    kind: ClassVar[str] = "drop_dirent"
    _bytes_fields: ClassVar[tuple[str, ...]] = ("name",)
    parent: int
    name: bytes


@dataclass(frozen=True)
class SetBlocks(Op):
    """Point blocks of a file at chunks; a None id makes the block a hole.

    Each entry is (block number, chunk id hex or None, plaintext length).
    """

    kind: ClassVar[str] = "blocks"
    ino: int
    blocks: tuple[tuple[int, str | None, int], ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "ino": self.ino, "blocks": [list(b) for b in self.blocks]}


@dataclass(frozen=True)
class TruncateBlocks(Op):
    """Drop every block numbered `first` or higher (a file shrank)."""

    kind: ClassVar[str] = "truncate"
    ino: int
    first: int


@dataclass(frozen=True)
class SetXattr(Op):
    """Set an extended attribute; value None removes it."""

    kind: ClassVar[str] = "xattr"
    _bytes_fields: ClassVar[tuple[str, ...]] = ("name", "value")
    ino: int
    name: bytes
    value: bytes | None


OPS: dict[str, type[Op]] = {
    c.kind: c
    for c in (SetInode, DropInode, SetDirent, DropDirent, SetBlocks, TruncateBlocks, SetXattr)
}

TXN_VERSION = 1


@dataclass(frozen=True)
class Transaction:
    ops: tuple[Op, ...]

    def encode(self) -> bytes:
        doc = {"v": TXN_VERSION, "ops": [op.to_json() for op in self.ops]}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Transaction:
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptRecordError(f"transaction is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("ops"), list):
            raise CorruptRecordError("transaction lacks its ops list")
        v = doc.get("v")
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CorruptRecordError(f"transaction version {v!r} is not a positive integer")
        if v > TXN_VERSION:
            raise NewerFormatError(
                f"transaction version {doc.get('v')} is newer than this vaultsync reads"
            )
        return cls(tuple(_decode_op(o) for o in doc["ops"]))


def _decode_op(o: Any) -> Op:
    if not isinstance(o, dict) or o.get("op") not in OPS:
        kind = o.get("op") if isinstance(o, dict) else o
        raise NewerFormatError(f"unknown transaction operation {kind!r}")
    cls = OPS[o["op"]]
    try:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in o:
                continue
            v = o[f.name]
            if f.name in cls._bytes_fields and v is not None:
                v = dec_bytes(v)
            elif cls is SetBlocks and f.name == "blocks":
                v = tuple((int(b[0]), b[1], int(b[2])) for b in v)
            kwargs[f.name] = v
        return cls(**kwargs)
    except (TypeError, ValueError, IndexError) as e:
        raise CorruptRecordError(f"malformed {o['op']!r} operation: {e}") from None
