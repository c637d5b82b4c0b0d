"""Patches: a chunk stored as the bytes that differ from another chunk (docs/format.md §6.3).

A 4 KiB write into a 64 KiB block changes one sixteenth of it, yet storing
the new block whole writes (and ships, and uploads) all of it. A patch stores
only what changed: the new block is the first `keep` bytes of a *base* chunk,
zero-extended to `length`, with `ranges` written over it. The patched chunk
keeps its own id (the hash of the whole new block), so deduplication and
verification on read work exactly as for any chunk; only the record differs.

Invariants (a writer keeps them, a reader checks them):

- a base is always a whole chunk, never a patch itself (reads need at most one
  extra record); a block patched again is patched against the same base, with
  the ranges of both patches merged (`rebase`);
- `ranges` are sorted, disjoint, non-empty and lie within `length`;
  `keep <= length`.

Pure: bytes in, bytes out. Which base to use, and when a whole chunk is the
better choice, is the writer's business (engine/filewrites.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vaultsync.errors import CorruptRecordError

# length, keep, count
_HEAD = struct.Struct("<III")
_RANGE = struct.Struct("<II")  # offset, size
MAX_RANGES = 1 << 16

Range = tuple[int, int]  # (offset, size)


@dataclass(frozen=True)
class PatchPlan:
    """How a block differs from `base`: the first `keep` bytes of it are still base's.

    Bytes from `keep` to the block's end are zero except where `ranges` (the
    block's own bytes) cover them.
    """

    base: bytes
    keep: int
    ranges: tuple[Range, ...]

    @property
    def patched_bytes(self) -> int:
        return sum(n for _o, n in self.ranges)


def add_range(ranges: list[Range], offset: int, size: int) -> None:
    """Insert [offset, offset+size) into sorted disjoint `ranges`, merging what touches it."""
    if size <= 0:
        return
    start, end = offset, offset + size
    out: list[Range] = []
    placed = False
    for o, n in ranges:
        if o + n < start:
            out.append((o, n))
        elif end < o:
            if not placed:
                out.append((start, end - start))
                placed = True
            out.append((o, n))
        else:  # overlaps or touches: absorb it
            start, end = min(start, o), max(end, o + n)
    if not placed:
        out.append((start, end - start))
    ranges[:] = out


def clip(ranges: Iterable[Range], end: int) -> list[Range]:
    """The parts of `ranges` below `end`."""
    out = []
    for o, n in ranges:
        if o >= end:
            break
        out.append((o, min(n, end - o)))
    return out


def rebase(outer: PatchPlan, inner_keep: int, inner_ranges: Sequence[Range]) -> PatchPlan:
    """`outer` patches a block that is itself a patch (`inner_*`) of `outer.base`'s base:
    the same block as a patch of that base directly (the caller sets `base`).

    The inner patch's ranges still hold their bytes in the new block wherever
    the outer patch kept them (below `outer.keep`); above it the block is the
    outer patch's alone.
    """
    merged = clip(inner_ranges, outer.keep)
    for o, n in outer.ranges:
        add_range(merged, o, n)
    return PatchPlan(outer.base, min(inner_keep, outer.keep), tuple(merged))


def encode(block: bytes | memoryview, keep: int, ranges: Sequence[Range]) -> bytes:
    """The patch plaintext that turns a base into `block` (its ranges' bytes taken from it)."""
    length = len(block)
    _check(length, keep, ranges)
    mv = memoryview(block)
    parts: list[bytes | memoryview] = [_HEAD.pack(length, keep, len(ranges))]
    parts += [_RANGE.pack(o, n) for o, n in ranges]
    parts += [mv[o : o + n] for o, n in ranges]
    return b"".join(parts)


def parse(plain: bytes) -> tuple[int, int, list[Range], int]:
    """(length, keep, ranges, offset of the first range's bytes) of a patch plaintext."""
    if len(plain) < _HEAD.size:
        raise CorruptRecordError("patch shorter than its header")
    length, keep, count = _HEAD.unpack_from(plain)
    table_end = _HEAD.size + count * _RANGE.size
    if count > MAX_RANGES or table_end > len(plain):
        raise CorruptRecordError("patch range table runs past its end")
    ranges = [_RANGE.unpack_from(plain, _HEAD.size + i * _RANGE.size) for i in range(count)]
    _check(length, keep, ranges)
    if table_end + sum(n for _o, n in ranges) != len(plain):
        raise CorruptRecordError("patch bytes do not match its range table")
    return length, keep, ranges, table_end


def apply(base: bytes, plain: bytes) -> bytes:
    """The block a patch plaintext makes of `base`'s plaintext (unverified: the caller
    compares its hash with the chunk id)."""
    length, keep, ranges, pos = parse(plain)
    if keep > len(base):
        raise CorruptRecordError(f"patch keeps {keep} bytes of a {len(base)}-byte base")
    out = bytearray(length)
    out[:keep] = memoryview(base)[:keep]
    for o, n in ranges:
        out[o : o + n] = memoryview(plain)[pos : pos + n]
        pos += n
    return bytes(out)


def _check(length: int, keep: int, ranges: Sequence[Range]) -> None:
    if keep > length:
        raise CorruptRecordError(f"patch keeps {keep} bytes of a {length}-byte block")
    end = 0
    for o, n in ranges:
        if n <= 0 or o < end or o + n > length:
            raise CorruptRecordError("patch ranges are not sorted, disjoint and inside the block")
        end = o + n
