"""Patch chunks (docs/format.md §6.3): the pure format, the codec, and its refusals."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_chunks import CODECS, KEYS_B
from vaultsync.errors import CorruptRecordError, CryptoError, FormatError
from vaultsync.format import patch
from vaultsync.format import segment as seg
from vaultsync.format.chunks import Codec, PatchNeedsBase
from vaultsync.format.patch import PatchPlan

BLOCK = 4096

# A block's history since it was loaded from a base: writes and truncations.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, BLOCK - 1), st.integers(1, 700)),
        st.tuples(st.just("truncate"), st.integers(0, BLOCK), st.just(0)),
    ),
    max_size=12,
)


def _run(
    base: bytes, ops: list[tuple[str, int, int]], seed: int
) -> tuple[bytes, int, list[patch.Range]]:
    """Drive a block the way FileData does and track (keep, ranges) the way it does."""
    buf = bytearray(base)
    keep, ranges = len(base), list[patch.Range]()
    for i, (kind, off, n) in enumerate(ops):
        if kind == "truncate":
            del buf[off:]
            keep = min(keep, off)
            ranges = patch.clip(ranges, off)
        else:
            n = min(n, BLOCK - off)
            if off > len(buf):
                buf.extend(bytes(off - len(buf)))
            buf[off : off + n] = bytes((seed + i + k) % 251 for k in range(n))
            patch.add_range(ranges, off, n)
    return bytes(buf), keep, ranges


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=BLOCK), OPS, st.integers(0, 250))
def test_a_block_is_its_base_and_its_patch(
    base: bytes, ops: list[tuple[str, int, int]], seed: int
) -> None:
    block, keep, ranges = _run(base, ops, seed)
    assert patch.apply(base, patch.encode(block, keep, ranges)) == block
    covered = [o for o, n in ranges for o in range(o, o + n)]
    assert covered == sorted(set(covered))  # sorted, disjoint
    assert all(n > 0 for _o, n in ranges)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=BLOCK), OPS, OPS, st.integers(0, 250))
def test_a_patch_of_a_patch_rebases_on_the_first_base(
    base: bytes, first: list[tuple[str, int, int]], second: list[tuple[str, int, int]], seed: int
) -> None:
    middle, keep1, ranges1 = _run(base, first, seed)
    last, keep2, ranges2 = _run(middle, second, seed + 1)
    plan = patch.rebase(PatchPlan(b"m" * 32, keep2, tuple(ranges2)), keep1, ranges1)
    assert patch.apply(base, patch.encode(last, plan.keep, plan.ranges)) == last


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40)), max_size=20))
def test_add_range_is_a_union(spans: list[tuple[int, int]]) -> None:
    ranges: list[tuple[int, int]] = []
    want: set[int] = set()
    for o, n in spans:
        patch.add_range(ranges, o, n)
        want |= set(range(o, o + n))
    got = [x for o, n in ranges for x in range(o, o + n)]
    assert got == sorted(want)
    # Touching ranges are merged: no two are adjacent.
    assert all(a + m < b for (a, m), (b, _n) in itertools.pairwise(ranges))


@pytest.mark.parametrize("bad", ["keep past length", "overlap", "past end", "short bytes"])
def test_malformed_patches_are_refused(bad: str) -> None:
    good = patch.encode(b"x" * 100, 50, [(10, 5), (60, 5)])
    length, keep, ranges, _ = patch.parse(good)
    assert (length, keep, ranges) == (100, 50, [(10, 5), (60, 5)])
    table = {
        "keep past length": (100, 101, [(10, 5)], b"y" * 5),
        "overlap": (100, 50, [(10, 5), (12, 5)], b"y" * 10),
        "past end": (100, 50, [(98, 5)], b"y" * 5),
        "short bytes": (100, 50, [(10, 5)], b"y" * 4),
    }
    length, keep, ranges, body = table[bad]
    raw = patch._HEAD.pack(length, keep, len(ranges))
    raw += b"".join(patch._RANGE.pack(o, n) for o, n in ranges) + body
    with pytest.raises(CorruptRecordError):
        patch.apply(b"b" * 100, raw)
    with pytest.raises(CorruptRecordError, match="keeps 50 bytes of a 10-byte base"):
        patch.apply(b"b" * 10, good)


@pytest.mark.parametrize("name", list(CODECS))
def test_patch_records_decode_only_with_their_base(name: str) -> None:
    codec = CODECS[name]()
    base = bytes(range(256)) * 16
    bid, _ = codec.chunk_record(base, 1, 1)
    block = bytearray(base)
    block[100:200] = b"z" * 100
    block += b"tail"
    plan = PatchPlan(bid, len(base), ((100, 100), (len(base), 4)))
    cid, rec = codec.patch_record(bytes(block), plan, 7, 9)
    assert cid == codec.chunk_id(bytes(block))
    assert seg.patch_base(rec) == bid and rec.flags & seg.FLAG_PATCH
    assert len(rec.payload) < 400  # only what changed is stored
    rec = seg.decode_record(seg.encode_record(rec))  # through the framing
    with pytest.raises(PatchNeedsBase) as ei:
        codec.decode_chunk(rec)
    assert ei.value.base == bid
    assert codec.decode_chunk(rec, expect_id=cid, base=base) == bytes(block)
    assert codec.patch_info(rec) == (bid, len(base), [(100, 100), (len(base), 4)])
    # Another base's plaintext gives other bytes: the id check refuses them.
    with pytest.raises(CorruptRecordError, match="does not match its hash"):
        codec.decode_chunk(rec, base=base[::-1])
    # Encrypted, the base id is authenticated: it cannot be swapped for another (without
    # encryption a swapped id makes the reader fetch another base: refused just above).
    if codec.keys is not None:
        other = replace(rec, payload=rec.payload[:32] + bytes(32) + rec.payload[64:])
        with pytest.raises(CryptoError):
            codec.decode_chunk(other, base=base)


def test_a_patch_decoded_with_the_wrong_key_is_refused() -> None:
    a, b = CODECS["encrypted"](), Codec(0, KEYS_B)
    bid, _ = a.chunk_record(b"base" * 100, 1, 1)
    _, rec = a.patch_record(b"bAse" * 100, PatchPlan(bid, 400, ((1, 1),)), 1, 1)
    with pytest.raises(CryptoError):
        b.decode_chunk(rec, base=b"base" * 100)


def test_the_patch_flag_only_belongs_on_chunk_records() -> None:
    txn = seg.Record(seg.RecordType.TXN, 1, 1, b"x" * 80, seg.FLAG_PATCH)
    with pytest.raises(FormatError, match="patch flag"):
        seg.decode_record(seg.encode_record(txn))
    short = seg.Record(seg.RecordType.CHUNK, 1, 1, b"x" * 40, seg.FLAG_PATCH)
    with pytest.raises(FormatError, match="patch flag"):
        seg.decode_record(seg.encode_record(short))
