"""Unit tests for vaultsync/txn.py: every op round-trips, byte strings survive, bad input fails."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.errors import CorruptRecordError, NewerFormatError
from vaultsync.format import txn
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

U64 = st.integers(min_value=0, max_value=2**64 - 1)
INO = st.integers(min_value=1, max_value=2**63 - 1)
NS = st.integers(min_value=0, max_value=2**63 - 1)
# Linux names: any bytes but NUL and "/", most of them not valid UTF-8.
NAMES = st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b and b"/" not in b)
ANY_BYTES = st.binary(max_size=300) | st.text(max_size=50).map(lambda s: s.encode())
CHUNK_HEX = st.binary(min_size=32, max_size=32).map(bytes.hex)

set_inode = st.builds(
    SetInode,
    ino=INO,
    mode=st.integers(0, 0o177777),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    size=U64,
    nlink=st.integers(0, 2**32 - 1),
    rdev=U64,
    atime_ns=NS,
    mtime_ns=NS,
    ctime_ns=NS,
    target=st.none() | ANY_BYTES,
)
drop_inode = st.builds(DropInode, ino=INO)
set_dirent = st.builds(SetDirent, parent=INO, name=NAMES, ino=INO)
drop_dirent = st.builds(DropDirent, parent=INO, name=NAMES)
set_blocks = st.builds(
    SetBlocks,
    ino=INO,
    blocks=st.lists(
        st.tuples(st.integers(0, 2**40), st.none() | CHUNK_HEX, st.integers(0, 2**26)),
        max_size=20,
    ).map(tuple),
)
truncate = st.builds(TruncateBlocks, ino=INO, first=st.integers(0, 2**40))
set_xattr = st.builds(SetXattr, ino=INO, name=ANY_BYTES, value=st.none() | ANY_BYTES)
ops_st = st.one_of(set_inode, drop_inode, set_dirent, drop_dirent, set_blocks, truncate, set_xattr)


def _round_trip(t: Transaction) -> Transaction:
    return Transaction.decode(t.encode())


@settings(max_examples=200, deadline=None)
@given(st.lists(ops_st, max_size=12))
def test_transaction_round_trip(ops: list[Op]) -> None:
    t = Transaction(tuple(ops))
    back = _round_trip(t)
    assert back == t
    assert [type(o) for o in back.ops] == [type(o) for o in ops]
    # Encoding is deterministic, so a re-encode is byte-identical.
    assert back.encode() == t.encode()


@pytest.mark.parametrize(
    "strategy",
    [set_inode, drop_inode, set_dirent, drop_dirent, set_blocks, truncate, set_xattr],
    ids=["inode", "drop_inode", "dirent", "drop_dirent", "blocks", "truncate", "xattr"],
)
def test_each_op_kind_round_trips(strategy: st.SearchStrategy[Op]) -> None:
    @settings(max_examples=100, deadline=None)
    @given(strategy)
    def check(op: Op) -> None:
        doc = json.loads(Transaction((op,)).encode())
        assert doc["v"] == 1
        assert doc["ops"][0]["op"] == op.kind
        assert _round_trip(Transaction((op,))).ops == (op,)

    check()


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_byte_strings_encode_as_utf8_text_or_b64(b: bytes) -> None:
    enc = txn.enc_bytes(b)
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError:
        assert enc == {"b64": base64.b64encode(b).decode()}
    else:
        assert enc == text
    assert txn.dec_bytes(json.loads(json.dumps(enc))) == b


@pytest.mark.parametrize(
    "name",
    [b"\xff\xfe", b"caf\xe9", b"\xed\xa0\x80", b"ok\x80", b"\xc0\xaf", "naïve 🦀".encode()],
)
def test_non_utf8_names_and_xattrs_survive(name: bytes) -> None:
    ops = (
        SetDirent(1, name, 2),
        DropDirent(1, name),
        SetInode(2, 0o120777, target=name),
        SetXattr(2, b"user." + name, name + b"\x00\xff"),
    )
    t = Transaction(ops)
    assert _round_trip(t) == t
    # The stored form is plain UTF-8 JSON (the format doc's requirement).
    t.encode().decode("utf-8")


def test_json_shape_matches_format_doc() -> None:
    ops = (
        SetInode(1, 0o040755, 0, 0, 4096, 2, 0, 1, 2, 3, None),
        SetInode(5, 0o120777, target=b"\xff/x"),
        DropInode(9),
        SetDirent(1, b"a", 5),
        DropDirent(1, b"\xfe"),
        SetBlocks(5, ((0, "ab" * 32, 10), (3, None, 4096))),
        TruncateBlocks(5, 4),
        SetXattr(5, b"user.k", None),
        SetXattr(5, b"user.k", b"\x80"),
    )
    doc = json.loads(Transaction(ops).encode())
    assert doc == {
        "v": 1,
        "ops": [
            {
                "op": "inode",
                "ino": 1,
                "mode": 0o040755,
                "uid": 0,
                "gid": 0,
                "size": 4096,
                "nlink": 2,
                "rdev": 0,
                "atime_ns": 1,
                "mtime_ns": 2,
                "ctime_ns": 3,
                "target": None,
            },
            {
                "op": "inode",
                "ino": 5,
                "mode": 0o120777,
                "uid": 0,
                "gid": 0,
                "size": 0,
                "nlink": 1,
                "rdev": 0,
                "atime_ns": 0,
                "mtime_ns": 0,
                "ctime_ns": 0,
                "target": {"b64": base64.b64encode(b"\xff/x").decode()},
            },
            {"op": "drop_inode", "ino": 9},
            {"op": "dirent", "parent": 1, "name": "a", "ino": 5},
            {"op": "drop_dirent", "parent": 1, "name": {"b64": "/g=="}},
            {"op": "blocks", "ino": 5, "blocks": [[0, "ab" * 32, 10], [3, None, 4096]]},
            {"op": "truncate", "ino": 5, "first": 4},
            {"op": "xattr", "ino": 5, "name": "user.k", "value": None},
            {"op": "xattr", "ino": 5, "name": "user.k", "value": {"b64": "gA=="}},
        ],
    }


def test_decodes_what_another_implementation_writes() -> None:
    """Key order and whitespace are free; fields a reader does not know are ignored."""
    raw = b"""
    { "ops": [
        {"ino": 7, "op": "dirent", "name": {"b64": "aGk="}, "parent": 1, "new": 1},
        {"value": "v", "name": "user.x", "ino": 7, "op": "xattr"},
        {"blocks": [[2, null, 5]], "op": "blocks", "ino": 7}
      ],
      "v": 1, "writer": "someone else" }
    """
    assert Transaction.decode(raw).ops == (
        SetDirent(1, b"hi", 7),
        SetXattr(7, b"user.x", b"v"),
        SetBlocks(7, ((2, None, 5),)),
    )


def test_empty_transaction() -> None:
    assert _round_trip(Transaction(())) == Transaction(())


# -- refusals -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rename", "chmod", "", None, 3])
def test_unknown_op_is_refused_not_skipped(kind: Any) -> None:
    raw = json.dumps({"v": 1, "ops": [{"op": "drop_inode", "ino": 1}, {"op": kind}]}).encode()
    with pytest.raises(NewerFormatError, match="unknown transaction operation"):
        Transaction.decode(raw)


def test_op_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(NewerFormatError):
        Transaction.decode(b'{"v":1,"ops":["inode"]}')


def test_newer_transaction_version_is_refused() -> None:
    with pytest.raises(NewerFormatError, match="version 2 is newer"):
        Transaction.decode(b'{"v":2,"ops":[]}')


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"\xff\xfe{}",
        b"[]",
        b"null",
        b'{"v":1}',
        b'{"v":1,"ops":{}}',
        b'{"v":1,"ops":[{"op":"inode"}]}',  # ino and mode missing
        b'{"v":1,"ops":[{"op":"dirent","parent":1,"ino":2}]}',
        b'{"v":1,"ops":[{"op":"dirent","parent":1,"name":{"b64":"!!"},"ino":2}]}',
        b'{"v":1,"ops":[{"op":"dirent","parent":1,"name":{"hex":"00"},"ino":2}]}',
        b'{"v":1,"ops":[{"op":"dirent","parent":1,"name":5,"ino":2}]}',
        b'{"v":1,"ops":[{"op":"blocks","ino":1,"blocks":[[1]]}]}',
        b'{"v":1,"ops":[{"op":"blocks","ino":1,"blocks":[["x",null,1]]}]}',
        b'{"v":1,"ops":[{"op":"blocks","ino":1,"blocks":7}]}',
    ],
)
def test_malformed_transactions_are_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptRecordError):
        Transaction.decode(raw)


@pytest.mark.parametrize("v", ['"2"', "null", "[1]", '{"x":1}'])
def test_non_integer_version_is_a_clear_error(v: str) -> None:
    """A `v` that is not a number is damage, not a TypeError traceback."""
    with pytest.raises((CorruptRecordError, NewerFormatError)):
        Transaction.decode(b'{"v":' + v.encode() + b',"ops":[]}')


def test_dec_bytes_rejects_non_byte_strings() -> None:
    for bad in (5, None, ["a"], {"b64": 5}):
        with pytest.raises(ValueError):
            txn.dec_bytes(bad)


def test_ops_registry_covers_every_kind() -> None:
    assert set(txn.OPS) == {
        "inode",
        "drop_inode",
        "dirent",
        "drop_dirent",
        "blocks",
        "truncate",
        "xattr",
    }
    for kind, cls in txn.OPS.items():
        assert cls.kind == kind
