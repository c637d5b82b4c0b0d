"""FileData, the dirty-block bookkeeping, against a plain model (hypothesis).

Blocks written whole are kept as immutable bytes and turned into a bytearray by
the first partial write; whatever the mix of whole writes, partial writes,
flush snapshots and truncates, every block must read back as the model says,
and a flush must hand over exactly the model's content. A block loaded from a
stored chunk must, at the flush, be exactly that chunk patched with the origin
FileData kept for it (what lets the flush store it as a patch). A block written
*unloaded* (its stored chunk not read yet) must, once the chunk is put under
it, hold the same as if it had been loaded first; `peek` must not show it
before, nor a flush take it.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from vaultsync.engine.filedata import FileData
from vaultsync.format import patch

BS = 16

Op = tuple[str, int, int, bytes]
BLOCKS = 4  # few: the same block is written, flushed, rewritten and cut often
_block = st.integers(0, BLOCKS - 1)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("whole"), _block, st.just(0), st.binary(min_size=BS, max_size=BS)),
        st.tuples(
            st.sampled_from(["patch", "upatch", "upatch"]),
            _block,
            st.integers(0, BS - 1),
            st.binary(min_size=1, max_size=BS),
        ),
        st.tuples(st.just("load"), _block, st.just(0), st.just(b"")),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(b"")),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(b"")),  # twice as likely
        st.tuples(st.just("truncate"), st.integers(0, (BLOCKS + 1) * BS), st.just(0), st.just(b"")),
    ),
    min_size=12,  # long enough for write, flush, rewrite, cut, read in one example
    max_size=60,
)


@settings(max_examples=1000, deadline=None)
@given(ops)
# An unloaded block cut by a truncate, then loaded: its base and ranges are cut too.
@example(
    [
        ("whole", 0, 0, b"a" * BS),
        ("flush", 0, 0, b""),
        ("upatch", 0, 2, b"x"),
        ("truncate", 8, 0, b""),
    ]
)
def test_blocks_read_back_as_written(seq: list[Op]) -> None:
    fd = FileData(BS, 0)
    dirty: dict[int, bytearray] = {}  # the model: what FileData holds
    stored: dict[int, bytes] = {}  # what a flush committed (the catalog's part)
    loaded: dict[int, bytes] = {}  # the stored content a dirty block was loaded from
    chunk: dict[int, bytes] = {}  # the whole chunk behind an unloaded block (what a read gets)

    def load(blocks: list[int]) -> None:  # as FileReads._load_bases
        for b in blocks:
            if b in fd.unloaded:
                assert fd.unloaded[b].cid == bytes([b]) * 32
                fd.load_base(b, chunk[b])

    for kind, a, off, data in seq:
        if kind == "whole":
            fd.put_whole(a, memoryview(data))
            dirty[a] = bytearray(data)
        elif kind == "load":
            load([a])
        elif kind in ("patch", "upatch"):
            data = data[: BS - off]
            if not fd.has_dirty(a):  # as FileWrites.write: load the base first, or not
                base = fd.peek(a)
                if base is None and a in stored and kind == "upatch":
                    fd.start_unloaded(a, bytes([a]) * 32, len(stored[a]))
                    loaded[a] = chunk[a] = stored[a]
                elif base is None and a in stored:
                    fd.start_block(a, stored[a], origin=bytes([a]) * 32)
                    loaded[a] = stored[a]
                else:
                    fd.start_block(a, b"" if base is None else bytes(base))
            fd.patch(a, off, memoryview(data))
            cur = dirty.setdefault(a, bytearray(stored.get(a, b"")))
            if off > len(cur):
                cur.extend(bytes(off - len(cur)))
            cur[off : off + len(data)] = data
        elif kind == "flush":
            load(list(fd.unloaded))
            snap, origins = fd.take_dirty()
            assert {b: bytes(v) for b, v in snap.items()} == {b: bytes(v) for b, v in dirty.items()}
            for b, o in origins.items():
                assert o.cid == bytes([b]) * 32
                assert patch.apply(loaded[b], patch.encode(snap[b], o.keep, o.ranges)) == snap[b]
            loaded.clear()
            fd.done_flushing(snap)
            stored.update({b: bytes(v) for b, v in dirty.items()})
            dirty.clear()
        else:
            fd.truncated(a)
            for table in (dirty, stored):
                for b in [b for b in table if b * BS >= a]:
                    del table[b]
            if a // BS in dirty:
                del dirty[a // BS][a % BS :]
            if a // BS in stored:
                stored[a // BS] = stored[a // BS][: a % BS]
        for b, want in dirty.items():
            got = fd.peek(b)
            if b in fd.unloaded:
                assert got is None, "an unloaded block was shown before its stored bytes"
                continue
            assert got is not None and bytes(got) == bytes(want), (kind, a, b)
        assert fd.dirty_bytes == sum(len(v) for v in dirty.values())
    load(list(fd.unloaded))
    for b, want in dirty.items():
        assert bytes(fd.blocks[b]) == bytes(want), b
    assert not fd.unloaded
