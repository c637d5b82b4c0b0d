"""The chunk reader: how a batch is cut into reads, and that every way in gives the same,
verified chunks.

The live volume's source is the journal (the end of this file); a recovered
volume's is a segment cache in front of a target, played here by `MemorySource`:
some segments as local files, the others "far", read by range as a target would
serve them. tests/servers/test_recovery_reads.py reads through a real target.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.engine.catalog import Catalog, StoredChunk
from vaultsync.engine.chunk_reader import ChunkReader, Item, SegmentSource, runs
from vaultsync.engine.journal import Location
from vaultsync.engine.volume import Volume
from vaultsync.errors import CorruptRecordError, VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.chunks import Codec
from vaultsync.format.header import new_header
from vaultsync.format.patch import PatchPlan
from vaultsync.format.txn import Transaction

# -- runs: pure ---------------------------------------------------------------------


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[Item], int]:
    """Records tiling a few segments with gaps, asked for in any order, some twice."""
    records: list[Location] = []
    for segno in range(1, draw(st.integers(1, 3)) + 1):
        off = draw(st.integers(0, 50))
        for _ in range(draw(st.integers(1, 12))):
            length = draw(st.integers(1, 40))
            records.append(Location(segno, off, length))
            off += length + draw(st.sampled_from([0, 0, 0, 1, 7]))  # mostly neighbours
    asked = draw(st.lists(st.sampled_from(records), min_size=1, max_size=30))
    return list(enumerate(asked)), draw(st.integers(1, 120))


@settings(max_examples=300)
@given(requests())
def test_runs_cover_every_item_once_and_stay_within_the_span(
    case: tuple[list[Item], int],
) -> None:
    items, span = case
    found = runs(items, span)
    flat = [it for seg_runs in found.values() for _, _, run in seg_runs for it in run]
    assert sorted(flat) == sorted(items)
    for segno, seg_runs in found.items():
        for start, end, run in seg_runs:
            assert all(loc.segno == segno for _, loc in run)
            assert start == min(loc.offset for _, loc in run)
            assert end == max(loc.offset + loc.length for _, loc in run)
            # One read per run: within the span, unless one record is longer than it.
            assert end - start <= span or len({loc for _, loc in run}) == 1
        for (s1, e1, _), (s2, _, run2) in itertools.pairwise(seg_runs):
            assert e1 <= s2, "runs overlap: bytes read twice"
            # Maximal: the next run starts after a gap, or joining it would pass the span.
            first = min(loc.offset + loc.length for _, loc in run2 if loc.offset == s2)
            assert s2 > e1 or first - s1 > span


def test_neighbours_make_one_run_and_a_gap_another() -> None:
    a, b, c = Location(1, 0, 10), Location(1, 10, 10), Location(1, 25, 10)
    assert runs([(0, b), (1, a), (2, c), (3, a)], 100) == {
        1: [(0, 20, [(1, a), (3, a), (0, b)]), (25, 35, [(2, c)])]
    }
    assert runs([(0, a), (1, b)], 20) == {1: [(0, 20, [(0, a), (1, b)])]}
    assert runs([(0, a), (1, b)], 19) == {1: [(0, 10, [(0, a)]), (10, 20, [(1, b)])]}
    # Asked twice, a record longer than the span is still read once.
    assert runs([(0, a), (1, a)], 5) == {1: [(0, 10, [(0, a), (1, a)])]}


# -- a reader over segments in memory -----------------------------------------------


class MemorySource(SegmentSource):
    """Segments in `near` are local files; the others are far, served by range."""

    def __init__(self, directory: Path, segments: dict[int, bytes], near: set[int]) -> None:
        self.dir = directory
        self.near = near
        self.far = {n: data for n, data in segments.items() if n not in near}
        for n in near:
            (directory / f"{n}.seg").write_bytes(segments[n])
        self.gone: set[int] = set()  # far segments a ranged read no longer finds
        self.spans: list[tuple[int, int, int]] = []
        self.recovered: list[bytes] = []
        self.good: dict[bytes, bytes] = {}  # what `recover` finds elsewhere

    def local_file(self, segno: int) -> Path | None:
        return self.dir / f"{segno}.seg" if segno in self.near else None

    def record_here(self, loc: Location) -> seg.Record | None:
        if loc.segno not in self.near:
            return None
        with open(self.dir / f"{loc.segno}.seg", "rb") as f:
            f.seek(loc.offset)
            return seg.decode_record(f.read(loc.length))

    async def span_far(self, segno: int, start: int, end: int) -> bytes | None:
        self.spans.append((segno, start, end))
        return None if segno in self.gone else self.far[segno][start:end]

    async def record_far(self, loc: Location, cid: bytes) -> seg.Record:
        return seg.decode_record(self.far[loc.segno][loc.offset : loc.offset + loc.length])

    async def recover(self, loc: Location, cid: bytes, error: Exception) -> bytes:
        self.recovered.append(cid)
        if cid in self.good:
            return self.good[cid]
        raise error


BS = 4096


def _volume(tmp_path: Path, near: set[int]) -> tuple[ChunkReader, MemorySource, dict[bytes, bytes]]:
    """Four segments of whole chunks and patches (each patch after its base), in a
    catalog; the reader over them, and every chunk's content by id."""
    rng = random.Random(4)
    codec = Codec(3)
    segments: dict[int, bytearray] = {n: bytearray(os.urandom(32)) for n in range(1, 5)}
    stored: list[StoredChunk] = []
    content: dict[bytes, bytes] = {}
    wholes: list[tuple[bytes, bytes]] = []
    for k in range(48):
        segno = 1 + k // 12
        if wholes and k % 4 == 3:
            bid, base = rng.choice(wholes)
            block = bytearray(base)
            block[100:164] = os.urandom(64)
            data = bytes(block)
            cid, rec = codec.patch_record(data, PatchPlan(bid, BS, ((100, 64),)), 1, 1)
        else:
            data = os.urandom(BS // 2) * 2  # compresses: records of different sizes
            cid, rec = codec.chunk_record(data, 1, 1)
            wholes.append((cid, data))
        raw = seg.encode_record(rec)
        if k % 7 == 6:
            segments[segno] += os.urandom(9)  # not every record follows its neighbour
        stored.append(StoredChunk.of(rec, Location(segno, len(segments[segno]), len(raw))))
        segments[segno] += raw
        content[cid] = data
    catalog = Catalog.open(tmp_path / "catalog.db")
    catalog.apply(1, Transaction(()), stored)
    source = MemorySource(tmp_path, {n: bytes(b) for n, b in segments.items()}, near)
    return ChunkReader(catalog, codec, source), source, content


def _careful_reads(reader: ChunkReader) -> list[bytes]:
    """Spy on the reader's one-by-one path, which its batches fall back to."""
    seen: list[bytes] = []
    real = reader.read_chunk

    async def spy(cid: bytes) -> bytes:
        seen.append(cid)
        return await real(cid)

    reader.read_chunk = spy  # type: ignore[method-assign]
    return seen


def _thread_trips(monkeypatch: pytest.MonkeyPatch) -> list[Callable[..., Any]]:
    trips: list[Callable[..., Any]] = []
    real = asyncio.to_thread

    async def counted(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        trips.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    return trips


@pytest.mark.parametrize("near", [set(), {1, 2, 3, 4}, {1, 3}], ids=["far", "near", "mixed"])
async def test_a_batch_gives_what_one_by_one_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, near: set[int]
) -> None:
    reader, source, content = _volume(tmp_path, near)
    reader.RUN_SPAN = 3 * BS
    ids = list(content)
    asked = random.Random(1).sample(ids, len(ids)) + ids[:5]  # any order, some twice
    careful = _careful_reads(reader)
    trips = _thread_trips(monkeypatch)
    got = await reader.read_chunks(asked)
    assert got == [content[c] for c in asked]
    assert careful == [], "a chunk went the one-by-one way"
    # The bases of the patches met come in one more batch. Each batch reads a far run
    # with one ranged read, and takes one thread trip for all its local records, one
    # per far run and one for its patches.
    bases = list(dict.fromkeys(b for c in asked if (b := reader.catalog.chunk_base(c))))
    batches = [_plan(reader, asked, near), _plan(reader, bases, near)]
    assert sorted(source.spans) == sorted(r for far_runs, _ in batches for r in far_runs)
    assert len(trips) == sum(len(far_runs) + other for far_runs, other in batches)
    # And one by one, the same.
    assert [await reader.read_chunk(c) for c in asked] == got


def _plan(
    reader: ChunkReader, cids: list[bytes], near: set[int]
) -> tuple[list[tuple[int, int, int]], int]:
    """The far runs a batch of `cids` reads, and its other thread trips."""
    items = [(i, loc) for i, c in enumerate(cids) if (loc := reader.catalog.chunk_location(c))]
    far = [(i, loc) for i, loc in items if loc.segno not in near]
    far_runs = [(n, s, e) for n, rs in runs(far, reader.RUN_SPAN).items() for s, e, _ in rs]
    patches = any(reader.catalog.chunk_base(c) for c in cids)
    return far_runs, int(len(far) < len(items)) + int(patches)


async def test_a_damaged_record_is_read_again_carefully_and_recovered(tmp_path: Path) -> None:
    reader, source, content = _volume(tmp_path, {1, 2, 3, 4})
    ids = list(content)
    bases = {reader.catalog.chunk_base(c) for c in ids}
    bad = next(c for c in ids if c not in bases and reader.catalog.chunk_base(c) is None)
    loc = reader.catalog.chunk_location(bad)
    assert loc is not None
    with open(tmp_path / f"{loc.segno}.seg", "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    careful = _careful_reads(reader)
    with pytest.raises(CorruptRecordError):
        await reader.read_chunks(ids)
    assert careful == [bad] and source.recovered == [bad]
    source.good[bad] = content[bad]  # the far copy: what the targets would give
    assert await reader.read_chunks(ids) == [content[c] for c in ids]
    assert careful == [bad, bad]


async def test_a_segment_gone_far_is_followed_one_by_one(tmp_path: Path) -> None:
    reader, source, content = _volume(tmp_path, {1})
    source.gone = {2}
    ids = list(content)
    careful = _careful_reads(reader)
    assert await reader.read_chunks(ids) == [content[c] for c in ids]
    in_2 = {c for c in ids if (loc := reader.catalog.chunk_location(c)) and loc.segno == 2}
    their_bases = {b for c in in_2 if (b := reader.catalog.chunk_base(c))}
    # Those chunks went one by one, and the patches among them read their bases so.
    assert set(careful) == in_2 | their_bases


async def test_an_unknown_chunk_is_named(tmp_path: Path) -> None:
    reader, _source, content = _volume(tmp_path, {1})
    with pytest.raises(VolumeError, match="is not in the catalog"):
        await reader.read_chunks([next(iter(content)), b"\x01" * 32])


# -- the live volume's source: the journal --------------------------------------------


async def _journal_volume(tmp_path: Path) -> tuple[Volume, list[bytes], list[bytes]]:
    vol = await Volume.create(tmp_path / "state", new_header("r", 64 * 1024, 3))
    blocks = [os.urandom(8 * 1024) for _ in range(6)]
    prepared = await vol.prepare_chunks(blocks)
    vol.commit_nowait([], prepared)
    await vol.sync()
    return vol, [p.id for p in prepared], blocks


async def test_a_small_record_in_memory_is_decoded_without_a_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol, ids, blocks = await _journal_volume(tmp_path)
    try:
        trips = _thread_trips(monkeypatch)
        assert await vol.read_chunk(ids[0]) == blocks[0]  # just written: in the page cache
        assert trips == []
        assert await vol.read_chunks(ids) == blocks
        assert len(trips) == 1, "one worker-thread trip for a batch of journal records"
    finally:
        await vol.close()


async def test_a_lost_journal_record_is_read_from_the_targets(tmp_path: Path) -> None:
    vol, ids, blocks = await _journal_volume(tmp_path)
    try:
        loc = vol.catalog.chunk_location(ids[2])
        assert loc is not None
        with open(vol.journal.path(loc.segno), "r+b") as f:
            f.seek(loc.offset + 40)
            f.write(b"\0" * 16)
        with pytest.raises(VolumeError, match="no target is configured"):
            await vol.read_chunks(ids)
        asked: list[tuple[Location, bytes]] = []

        async def fetch_remote(where: Location, cid: bytes) -> bytes:
            asked.append((where, cid))
            return blocks[ids.index(cid)]

        vol.fetch_remote = fetch_remote
        assert await vol.read_chunks(ids) == blocks
        assert await vol.read_chunk(ids[2]) == blocks[2]
        assert asked == [(loc, ids[2])] * 2
    finally:
        await vol.close()
