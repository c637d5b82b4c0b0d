"""The catalog's in-memory inode cache never disagrees with its table.

`Catalog.inode` answers from memory when it can; only `apply` changes inodes,
and a transaction that fails is rolled back whole. Histories of inode
creations, replacements and drops, some transactions failing midway, must
leave every cached answer equal to what SQLite holds. Listings, which read a
page of entries with their inodes in one query, give the same inodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.engine.catalog import Catalog, Inode
from vaultsync.format.txn import DropDirent, DropInode, Op, SetDirent, SetInode, Transaction


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
def test_cached_inodes_match_the_table(
    tmp_path_factory: object, history: list[tuple[list[Op], bool]]
) -> None:
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


def test_listing_pages_give_every_entry_with_its_inode_through_the_index(tmp_path: Path) -> None:
    cat = Catalog.open(tmp_path / "catalog.db")
    lsn = 0
    for ino in range(10, 1510):  # two directories, entries interleaved
        lsn += 1
        parent = 2 + ino % 2
        node = SetInode(ino=ino, mode=0o100644, size=ino, nlink=1)
        cat.apply(lsn, Transaction((node, SetDirent(parent, b"n%d" % ino, ino))))
    lsn += 1
    cat.apply(lsn, Transaction((DropDirent(2, b"n500"), DropInode(500))))
    listed, after = [], 0
    while page := cat.listdir(2, after, 256):
        listed += page
        after = page[-1][0].id
    assert [d.ino for d, _ in listed] == [i for i in range(10, 1510, 2) if i != 500]
    assert all(i == cat.inode(d.ino) and i.size == d.ino for d, i in listed)
    sql: list[str] = []
    cat.db.set_trace_callback(sql.append)  # the statement a page runs, values bound
    cat.listdir(2, 0, 256)
    cat.db.set_trace_callback(None)
    plan = " ".join(str(r) for r in cat.db.execute("EXPLAIN QUERY PLAN " + sql[-1]))
    assert "dirents_by_parent" in plan and "TEMP B-TREE" not in plan, plan
    cat.close()
