"""Unit tests for vaultsync/journal.py: append, reopen, torn-tail recovery, seal."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vaultsync.engine.journal import Journal, Location, segment_name
from vaultsync.errors import CorruptRecordError, VolumeError
from vaultsync.format import segment as seg

VID = bytes(range(16))


def _chunk(lsn: int, tag: bytes = b"") -> seg.Record:
    return seg.Record(seg.RecordType.CHUNK, lsn, lsn * 10, bytes([lsn % 256]) * 32 + tag)


def _txn(lsn: int) -> seg.Record:
    return seg.Record(seg.RecordType.TXN, lsn, lsn * 10, b'{"v":1,"ops":[],"lsn":%d}' % lsn)


def _commit(j: Journal, lsn: int, chunks: int = 1) -> list[seg.Record]:
    recs = [_chunk(lsn, b"%d" % i) for i in range(chunks)] + [_txn(lsn)]
    j.append(recs)
    return recs


def _open(d: Path, expect_lsn: int = 0) -> Journal:
    j, report = Journal.open(d, VID, 0, expect_lsn)
    assert report.cut_bytes == 0 and report.removed_empty == 0
    return j


def _records(j: Journal, after: int = 0) -> list[seg.Record]:
    return [r for _, r in j.iter_committed(after)]


def _flip_byte(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x40
    path.write_bytes(bytes(b))


# -- a fresh journal -----------------------------------------------------------------------


def test_open_creates_segment_one(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    j, report = Journal.open(d, VID)
    try:
        assert report.cut_bytes == 0 and report.removed_empty == 0 and report.cut_reason is None
        assert j.segment_numbers() == [1]
        assert (j.segno, j.size, j.records, j.last_lsn, j.first_lsn) == (
            1,
            seg.HEADER_SIZE,
            0,
            0,
            None,
        )
        path = d / "0000000000000001.seg"
        assert j.path(1) == path
        assert path.stat().st_mode & 0o777 == 0o600
        h = seg.SegmentHeader.unpack(path.read_bytes())
        assert (h.volume_id, h.segment_no, h.epoch) == (VID, 1, 0)
        assert list(j.iter_committed()) == []
    finally:
        j.close()


def test_segment_name() -> None:
    assert segment_name(1) == "0000000000000001.seg"
    assert segment_name(0xABC) == "0000000000000abc.seg"


def test_empty_journal_but_catalog_has_lsn_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CorruptRecordError, match=r"journal is empty.*LSN 3"):
        Journal.open(tmp_path, VID, 0, expect_lsn=3)


# -- append, read, reopen ----------------------------------------------------------------------


def test_append_returns_locations_and_read_gets_records_back(tmp_path: Path) -> None:
    j = _open(tmp_path)
    recs = _commit(j, 1, chunks=2)
    locs = j.append([_txn(2)])
    first = j.append(recs[:0])
    assert first == []
    assert j.last_lsn == 2 and j.first_lsn == 1
    assert j.needs_sync
    j.sync()
    assert not j.needs_sync
    assert locs == [Location(1, seg.HEADER_SIZE + sum(r.size for r in recs), _txn(2).size)]
    assert j.read(locs[0]) == _txn(2)
    # Past the records, the open file holds nothing but zeros (the runway)...
    on_disk = (tmp_path / segment_name(1)).read_bytes()
    assert len(on_disk) > j.size and not any(on_disk[j.size :])
    assert j.records == 4
    size = j.size
    j.close()
    # ...and a closed one ends exactly at its last record.
    assert (tmp_path / segment_name(1)).stat().st_size == size


def test_reopen_iter_committed_yields_exactly_the_committed_records(tmp_path: Path) -> None:
    j = _open(tmp_path)
    expected: list[seg.Record] = []
    for lsn in range(1, 6):
        expected += _commit(j, lsn, chunks=lsn % 3)
    j.close()
    j = _open(tmp_path, expect_lsn=5)
    try:
        assert j.last_lsn == 5 and j.first_lsn == 1
        assert j.records == len(expected)
        got = list(j.iter_committed())
        assert [r for _, r in got] == expected
        for loc, rec in got:
            assert j.read(loc) == rec
        assert _records(j, after=3) == [r for r in expected if r.lsn > 3]
        assert _records(j, after=5) == []
        # Appending continues at the end.
        more = _commit(j, 6)
        assert _records(j, after=5) == more
    finally:
        j.close()


def test_torn_tail_after_last_txn_is_cut_on_open(tmp_path: Path) -> None:
    j = _open(tmp_path)
    kept = _commit(j, 1) + _commit(j, 2, chunks=2)
    j.close()
    path = tmp_path / segment_name(1)
    committed = path.stat().st_size
    torn = seg.encode_record(_chunk(3)) + seg.encode_record(_txn(3))[:-7]
    with path.open("ab") as f:
        f.write(torn)

    j, report = Journal.open(tmp_path, VID, 0, expect_lsn=2)
    try:
        assert report.cut_bytes == len(torn)
        assert report.cut_reason is not None and "incomplete" in report.cut_reason
        assert path.stat().st_size == committed == j.size
        assert j.last_lsn == 2
        assert _records(j) == kept
        # LSN 3 can be written again after the cut, and reads back whole.
        again = _commit(j, 3)
        j.sync()
        assert _records(j, after=2) == again
    finally:
        j.close()
    j = _open(tmp_path, expect_lsn=3)
    assert _records(j) == kept + again
    j.close()


def test_torn_tail_at_every_cut_point(tmp_path: Path) -> None:
    j = _open(tmp_path / "src")
    recs = _commit(j, 1) + _commit(j, 2, chunks=2) + _commit(j, 3, chunks=0)
    j.close()
    full = (tmp_path / "src" / segment_name(1)).read_bytes()
    txn_ends, off = [seg.HEADER_SIZE], seg.HEADER_SIZE
    for r in recs:
        off += r.size
        if r.type is seg.RecordType.TXN:
            txn_ends.append(off)
    for cut in range(seg.HEADER_SIZE, len(full) + 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / segment_name(1)).write_bytes(full[:cut])
        j, report = Journal.open(d, VID)
        keep = max(e for e in txn_ends if e <= cut)
        assert report.cut_bytes == cut - keep
        assert (d / segment_name(1)).stat().st_size == keep == j.size
        committed = [r for r in recs if r.lsn <= txn_ends.index(keep)]
        assert _records(j) == committed
        assert j.last_lsn == txn_ends.index(keep)
        j.close()


def test_uncommitted_chunks_after_last_txn_are_cut(tmp_path: Path) -> None:
    j = _open(tmp_path)
    kept = _commit(j, 1)
    j.append([_chunk(2), _chunk(2, b"x")])  # the crash came before TXN 2
    j.close()
    j, report = Journal.open(tmp_path, VID, 0, expect_lsn=1)
    try:
        assert report.cut_bytes == _chunk(2).size + _chunk(2, b"x").size
        assert report.cut_reason == "uncommitted chunk records after the last transaction"
        assert _records(j) == kept
        assert j.records == 2
    finally:
        j.close()


def test_journal_shorter_than_catalog_is_refused_and_left_alone(tmp_path: Path) -> None:
    j = _open(tmp_path)
    _commit(j, 1)
    _commit(j, 2)
    j.close()
    path = tmp_path / segment_name(1)
    before = path.read_bytes()
    # Damage in the middle, not a torn tail: the catalog has applied LSN 2.
    _flip_byte(path, seg.HEADER_SIZE + 30)
    damaged = path.read_bytes()
    with pytest.raises(CorruptRecordError, match="catalog has applied LSN 2") as ei:
        Journal.open(tmp_path, VID, 0, expect_lsn=2)
    assert "restore" in str(ei.value)
    assert path.read_bytes() == damaged != before  # nothing was cut


def test_foreign_journal_is_refused(tmp_path: Path) -> None:
    _open(tmp_path).close()
    with pytest.raises(VolumeError, match="another volume"):
        Journal.open(tmp_path, bytes(16), 0)


# -- seal ------------------------------------------------------------------------------------------


def test_seal_returns_segno_first_lsn_size_and_starts_a_new_segment(tmp_path: Path) -> None:
    j = _open(tmp_path)
    recs = _commit(j, 1) + _commit(j, 2)
    size_before = j.size
    sealed, first, size = j.seal()
    seal_rec = seg.Record(seg.RecordType.SEAL, 2, 0, seg.seal_payload(len(recs), 2))
    assert (sealed, first) == (1, 1)
    assert size == size_before + seal_rec.size
    assert (j.segno, j.size, j.records, j.first_lsn) == (2, seg.HEADER_SIZE, 0, None)
    assert j.last_lsn == 2
    assert j.needs_sync
    j.sync()
    assert not j.needs_sync
    assert j.segment_numbers() == [1, 2]
    path1 = tmp_path / segment_name(1)
    assert path1.stat().st_size == size
    scan = seg.scan_segment(path1.read_bytes())
    assert scan.sealed and scan.stop_reason is None
    assert seg.parse_seal(scan.records[-1][1].payload) == (len(recs), 2)
    assert scan.records[-1][1].lsn == 2
    assert j.sealed_info(1) == (1, 2, size)
    h2 = seg.SegmentHeader.unpack((tmp_path / segment_name(2)).read_bytes())
    assert h2.segment_no == 2 and h2.volume_id == VID

    more = _commit(j, 3)
    assert j.first_lsn == 3
    assert _records(j) == recs + more
    sealed, first, size = j.seal()
    assert (sealed, first) == (2, 3)
    assert j.segno == 3
    j.close()

    j = _open(tmp_path, expect_lsn=3)
    try:
        assert (j.segno, j.last_lsn, j.first_lsn) == (3, 3, None)
        assert j.sealed_info(2) == (3, 3, size)
        assert _records(j) == recs + more
        assert _records(j, after=2) == more
    finally:
        j.close()


def test_a_seal_without_room_for_the_next_segment_is_taken_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at a seal leaves the segment open and whole; the next seal works."""
    j = _open(tmp_path)
    recs = _commit(j, 1)
    before = (j.segno, j.size, j.records)
    real_write = os.write

    def no_room(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_room)  # the next segment's header
    with pytest.raises(OSError) as e:
        j.seal()
    monkeypatch.setattr(os, "write", real_write)
    assert e.value.errno == errno.ENOSPC
    assert (j.segno, j.size, j.records) == before
    assert j.segment_numbers() == [1]  # the half-made file is gone again
    assert (tmp_path / segment_name(1)).stat().st_size == j.size  # the seal record too
    more = _commit(j, 2)  # appends go on in the same segment
    j.sync()
    assert _records(j) == recs + more
    assert j.seal()[0] == 1
    j.close()
    j = _open(tmp_path, expect_lsn=2)
    try:
        assert j.segno == 2 and _records(j) == recs + more
    finally:
        j.close()


def test_a_failed_append_leaves_nothing_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = _open(tmp_path)
    recs = _commit(j, 1)
    j.sync()  # lays runway ahead: the failed write below lands in it
    size = j.size

    def half(fd: int, parts: list[bytes], at: int) -> int:
        os.pwrite(fd, b"\xff" * 10, at)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", half)
    with pytest.raises(OSError):
        _commit(j, 2)
    monkeypatch.undo()
    assert j.size == size and j.last_lsn == 1
    more = _commit(j, 2)  # the same LSN again, over the torn bytes
    j.close()
    j = _open(tmp_path, expect_lsn=2)
    try:
        assert _records(j) == recs + more
    finally:
        j.close()


def test_seal_of_segment_without_transactions(tmp_path: Path) -> None:
    j = _open(tmp_path)
    _commit(j, 1)
    j.seal()
    sealed, first, size = j.seal()
    assert (sealed, first) == (2, None)
    assert size == seg.HEADER_SIZE + seg.RECORD_OVERHEAD + 12
    assert j.sealed_info(2) == (None, 1, size)
    j.close()
    j = _open(tmp_path, expect_lsn=1)
    assert (j.segno, j.last_lsn) == (3, 1)
    j.close()


def test_reopen_finds_last_lsn_in_older_segment(tmp_path: Path) -> None:
    j = _open(tmp_path)
    _commit(j, 1)
    _commit(j, 2)
    j.seal()
    j.close()
    j = _open(tmp_path, expect_lsn=2)
    try:
        assert (j.segno, j.last_lsn, j.size) == (2, 2, seg.HEADER_SIZE)
        # The next transaction continues the sequence.
        _commit(j, 3)
        assert j.last_lsn == 3
    finally:
        j.close()


def test_crash_after_seal_before_next_segment_exists(tmp_path: Path) -> None:
    j = _open(tmp_path)
    recs = _commit(j, 1)
    j.seal()
    j.close()
    (tmp_path / segment_name(2)).unlink()
    j = _open(tmp_path, expect_lsn=1)
    try:
        assert j.segno == 2 and j.last_lsn == 1
        assert j.segment_numbers() == [1, 2]
        assert _records(j) == recs
    finally:
        j.close()


@pytest.mark.parametrize("keep", [0, 1, 30, 63])
def test_newest_segment_with_torn_header_is_removed(tmp_path: Path, keep: int) -> None:
    j = _open(tmp_path)
    recs = _commit(j, 1)
    j.seal()
    j.close()
    path2 = tmp_path / segment_name(2)
    path2.write_bytes(path2.read_bytes()[:keep])
    j, report = Journal.open(tmp_path, VID, 0, expect_lsn=1)
    try:
        assert report.removed_empty == 1
        assert j.segno == 2 and j.last_lsn == 1
        assert seg.SegmentHeader.unpack(path2.read_bytes()).segment_no == 2
        assert _records(j) == recs
    finally:
        j.close()


def test_sealed_info_of_open_segment_is_refused(tmp_path: Path) -> None:
    j = _open(tmp_path)
    _commit(j, 1)
    with pytest.raises(CorruptRecordError, match="not sealed"):
        j.sealed_info(1)
    j.close()


def test_append_after_close_is_refused(tmp_path: Path) -> None:
    j = _open(tmp_path)
    j.close()
    with pytest.raises(VolumeError, match="closed"):
        j.append([_txn(1)])


def test_sync_work_makes_sealed_segments_durable(tmp_path: Path) -> None:
    j = _open(tmp_path)
    _commit(j, 1)
    j.seal()
    work = j.sync_work()
    assert not j.needs_sync  # taken: owed to `work` now
    work()
    _commit(j, 2)
    assert j.needs_sync
    j.close()
    assert not j.needs_sync


# -- damage that is not a torn tail ---------------------------------------------------------


def test_damaged_sealed_segment_is_not_skipped_silently(tmp_path: Path) -> None:
    """A CRC failure inside an older, sealed segment must not yield an LSN gap."""
    j = _open(tmp_path)
    for lsn in (1, 2, 3):
        _commit(j, lsn)
    j.seal()
    for lsn in (4, 5):
        _commit(j, lsn)
    j.close()
    path1 = tmp_path / segment_name(1)
    # Damage TXN 2's payload (CHUNK 1, TXN 1, CHUNK 2, then TXN 2).
    off = seg.HEADER_SIZE + _chunk(1, b"0").size + _txn(1).size + _chunk(2, b"0").size + 30
    _flip_byte(path1, off)
    j = _open(tmp_path, expect_lsn=5)
    try:
        with pytest.raises(CorruptRecordError):
            lsns = [r.lsn for r in _records(j) if r.type is seg.RecordType.TXN]
            # What must never happen: 1, 4, 5 with 2 and 3 silently missing.
            assert lsns == [1, 2, 3, 4, 5]
    finally:
        j.close()


def test_newest_segment_with_damaged_header_but_records_is_not_deleted(tmp_path: Path) -> None:
    """Only a header that was never completely written may be dropped, not one with data."""
    j = _open(tmp_path)
    _commit(j, 1)
    _commit(j, 2)
    j.close()
    path = tmp_path / segment_name(1)
    _flip_byte(path, 40)  # header epoch: the header checksum fails, the records are intact
    damaged = path.read_bytes()
    with pytest.raises(CorruptRecordError):
        Journal.open(tmp_path, VID, 0, expect_lsn=2)
    assert path.exists() and path.read_bytes() == damaged
    # Even when the catalog knows no LSN, committed records must not vanish silently.
    try:
        j, report = Journal.open(tmp_path, VID, 0, expect_lsn=0)
    except CorruptRecordError:
        pass
    else:
        j.close()
        raise AssertionError(f"opened, dropping a segment holding LSNs 1-2 ({report})")
    assert path.exists() and path.read_bytes() == damaged


def test_appended_records_are_visible_before_sync(tmp_path: Path) -> None:
    """append() writes through to the file (visible to readers) without waiting for the disk."""
    j = _open(tmp_path)
    _commit(j, 1)
    assert os.path.getsize(tmp_path / segment_name(1)) == j.size
    assert j.dirty
    j.close()


def test_runway_left_by_a_dead_process_is_cut_silently_and_writes_go_on(tmp_path: Path) -> None:
    """Small syncs write zeros ahead; a crash leaves them, and open() must treat them as nothing."""
    j = _open(tmp_path)
    kept = _commit(j, 1) + _commit(j, 2, chunks=1)
    j.sync()
    path = tmp_path / segment_name(1)
    size = j.size
    assert path.stat().st_size >= size + Journal.RUNWAY // 2
    os.close(j._fd)  # the process dies: no close(), the runway stays
    j2, report = Journal.open(tmp_path, VID, 0, expect_lsn=2)
    try:
        assert report.cut_bytes == 0 and report.cut_reason is None
        assert path.stat().st_size == size == j2.size
        assert _records(j2) == kept
        more = _commit(j2, 3)
        j2.sync()
        assert _records(j2, after=2) == more
    finally:
        j2.close()
    # A torn record followed by runway zeros is a real cut, reported with the zeros.
    j3 = _open(tmp_path, expect_lsn=3)
    end = j3.size
    torn = seg.encode_record(_txn(4))[:-3]
    os.pwrite(j3._fd, torn + bytes(4096), end)
    os.close(j3._fd)
    j4, report = Journal.open(tmp_path, VID, 0, expect_lsn=3)
    assert report.cut_bytes == len(torn) + 4096
    assert j4.size == end and j4.last_lsn == 3
    j4.close()
    assert path.stat().st_size == end


def test_large_syncs_write_no_runway(tmp_path: Path) -> None:
    """Zeros ahead would double a large writer's disk traffic: only small syncs get them."""
    j = _open(tmp_path)
    j.append([_chunk(1, bytes(Journal.RUNWAY_SMALL_SYNC + 1)), _txn(1)])
    j.sync()
    assert (tmp_path / segment_name(1)).stat().st_size == j.size
    j.close()


def test_only_a_short_stretch_of_runway_is_a_small_sync(tmp_path: Path) -> None:
    """small_sync lets the volume fdatasync on the event loop: only what is quick qualifies."""
    j = _open(tmp_path)
    _commit(j, 1)
    assert not j.small_sync, "a new segment's first sync also makes its directory entry durable"
    j.sync()
    _commit(j, 2, chunks=1)
    assert j.small_sync, "a few records inside the runway"
    j.sync()
    j.append([_chunk(3, os.urandom(Journal.INLINE_SYNC + 1)), _txn(3)])
    assert not j.small_sync, "more than INLINE_SYNC owed"
    j.sync()
    _commit(j, 4)
    j.seal()
    _commit(j, 5)
    assert not j.small_sync, "a sealed segment's fsync is owed"
    j.sync()
    _commit(j, 6)
    assert j.small_sync
    j.close()


def test_a_mount_reads_only_what_the_catalog_has_not_applied(tmp_path: Path) -> None:
    """Sealed segments wholly applied are skipped by their seal alone: a byte flipped
    inside one is not even seen, while a replay that needs it still checks every record."""
    j = _open(tmp_path)
    for lsn in (1, 2):
        _commit(j, lsn)
    j.seal()
    old = j.segment_numbers()[0]
    _commit(j, 3)
    j.seal()  # the last segment is sealed too: a clean unmount
    j.sync()
    j.close()
    _flip_byte(tmp_path / segment_name(old), seg.HEADER_SIZE + 10)
    j2 = _open(tmp_path, expect_lsn=3)
    assert j2.last_lsn == 3 and j2.segno == 3, "opened after the sealed segment, not rescanned"
    assert [r.lsn for r in _records(j2, after=2)] == [3, 3]
    with pytest.raises(CorruptRecordError, match="damaged"):
        _records(j2, after=0)
    j2.close()


def test_seal_at_end_reads_a_seal_and_nothing_else() -> None:
    payload = seg.seal_payload(7, 41)
    raw = seg.encode_record(seg.Record(seg.RecordType.SEAL, 41, 5, payload))
    assert len(raw) == seg.SEAL_RECORD_SIZE and seg.seal_at_end(raw) == 41
    bad = bytearray(raw)
    bad[-1] ^= 1
    assert seg.seal_at_end(bytes(bad)) is None
    assert seg.seal_at_end(raw[1:]) is None
    assert seg.seal_at_end(bytes(len(raw))) is None  # runway zeros
    txn = seg.encode_record(seg.Record(seg.RecordType.TXN, 41, 5, bytes(len(payload))))
    assert seg.seal_at_end(txn) is None


def test_a_batch_of_records_lands_byte_for_byte_as_encoded(tmp_path: Path) -> None:
    """append() writes header, payload and checksum of each record without joining them
    (a vectored write): the file must hold exactly the encoded records, more than
    IOV_MAX buffers included."""
    j = _open(tmp_path)
    recs = [_chunk(1, os.urandom(n)) for n in (0, 1, 4095, 70_000)] * 100 + [_txn(1)]
    start = j.size
    locs = j.append(recs)
    want = b"".join(seg.encode_record(r) for r in recs)
    assert [loc.offset for loc in locs][:2] == [start, start + recs[0].size]
    got = (tmp_path / segment_name(1)).read_bytes()[start : start + len(want)]
    assert got == want
    assert j.read(locs[3]) == recs[3]
    j.close()


def _fs_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts (longest prefix)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, fstype, *_ = line.split()
        if str(path).startswith(where.rstrip("/") + "/") and len(where) > len(best):
            best, kind = where, fstype
    return kind


def test_read_if_cached_reads_hot_records_and_leaves_cold_ones(tmp_path: Path) -> None:
    j = _open(tmp_path)
    big = seg.Record(seg.RecordType.CHUNK, 1, 10, os.urandom(64 * 1024))
    locs = j.append([big, _txn(1)])
    j.sync()
    assert j.read_if_cached(locs[0]) == big == j.read(locs[0])
    assert j.read_if_cached(locs[1]) == _txn(1)
    j.close()
    # Out of the page cache, the read would wait for the disk: it is left to the caller.
    fd = os.open(tmp_path / segment_name(1), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    got = j.read_if_cached(locs[0])
    if _fs_type(tmp_path) in ("ext4", "xfs", "btrfs"):  # tmpfs pages are the storage itself
        assert got is None
    assert got in (None, big)
    # A damaged record in the cache is an error, as with `read`, never wrong bytes.
    _flip_byte(tmp_path / segment_name(1), locs[0].offset + 100)
    with pytest.raises(CorruptRecordError):
        j.read_if_cached(locs[0])
