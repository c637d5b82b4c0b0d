"""The catalog's in-memory inode cache never disagrees with its table.

`Catalog.inode` answers from memory when it can; only `apply` changes inodes,
and a transaction that fails is rolled back whole. Histories of inode
creations, replacements and drops, some transactions failing midway, must
leave every cached answer equal to what SQLite holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.catalog import Catalog, Inode
from vaultsync.txn import DropInode, Op, SetInode, Transaction


@dataclass(frozen=True)
class _Boom(Op):
    """An op the catalog does not know: applying it raises, so the transaction rolls back."""

    kind = "boom"


_inos = st.integers(min_value=2, max_value=12)
_set = st.builds(
    SetInode,
    ino=_inos,
    mode=st.sampled_from([0o100644, 0o40755, 0o120777]),
    size=st.integers(min_value=0, max_value=1 << 40),
    nlink=st.integers(min_value=0, max_value=3),
    mtime_ns=st.integers(min_value=0, max_value=1 << 62),
    target=st.one_of(st.none(), st.binary(max_size=8)),
)
_op = st.one_of(_set, st.builds(DropInode, ino=_inos))
_txn = st.tuples(st.lists(_op, min_size=1, max_size=5), st.booleans())


def _row(cat: Catalog, ino: int) -> Inode | None:
    row = cat.db.execute(
        "SELECT ino, mode, uid, gid, size, nlink, rdev, atime_ns, mtime_ns, ctime_ns, target "
        "FROM inodes WHERE ino=?",
        (ino,),
    ).fetchone()
    return None if row is None else Inode(*row)


@settings(max_examples=60, deadline=None)
@given(history=st.lists(_txn, min_size=1, max_size=25))
def test_cached_inodes_match_the_table(tmp_path_factory: object, history: list) -> None:
    d: Path = tmp_path_factory.mktemp("cat")  # type: ignore[attr-defined]
    cat = Catalog.open(d / "catalog.db")
    try:
        for lsn, (ops, fails) in enumerate(history, start=1):
            for ino in range(2, 13):
                cat.inode(ino)  # fill the cache, so a stale entry would be seen
            txn = Transaction(tuple(ops) + ((_Boom(),) if fails else ()))
            try:
                cat.apply(lsn, txn)
            except TypeError:
                assert fails
            for ino in range(2, 13):
                assert cat.inode(ino) == _row(cat, ino), (lsn, ino)
        cat.commit()
    finally:
        cat.close()
