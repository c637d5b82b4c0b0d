"""Unit tests for vaultsync/segment.py: framing, checksums, torn tails, refusal of newer data."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.errors import CorruptRecordError, FormatError, NewerFormatError
from vaultsync.format import segment as seg

VOLUME_ID = bytes(range(16))
U64 = st.integers(min_value=0, max_value=2**64 - 1)

records_st = st.builds(
    seg.Record,
    type=st.sampled_from(list(seg.RecordType)),
    lsn=U64,
    time_ns=U64,
    payload=st.binary(max_size=2048),
    flags=st.sampled_from(
        [0, seg.FLAG_ZSTD, seg.FLAG_ENCRYPTED, seg.FLAG_ZSTD | seg.FLAG_ENCRYPTED]
    ),
)
# Records that may appear before a seal (a SEAL payload must parse).
body_records_st = st.builds(
    seg.Record,
    type=st.sampled_from([seg.RecordType.CHUNK, seg.RecordType.TXN]),
    lsn=U64,
    time_ns=U64,
    payload=st.binary(max_size=300),
    flags=st.integers(min_value=0, max_value=3),
)


def _header(segno: int = 1) -> seg.SegmentHeader:
    return seg.SegmentHeader(VOLUME_ID, segno, 7, 1_700_000_000_000_000_000)


def _small_segment() -> tuple[bytes, list[seg.Record], list[int]]:
    """A sealed segment: CHUNK, TXN, CHUNK, CHUNK, TXN, SEAL; with each record's end offset."""
    recs = [
        seg.Record(seg.RecordType.CHUNK, 1, 10, b"\x01" * 32 + b"chunk one"),
        seg.Record(seg.RecordType.TXN, 1, 10, b'{"v":1,"ops":[]}'),
        seg.Record(seg.RecordType.CHUNK, 2, 20, b"\x02" * 32 + b"two", seg.FLAG_ZSTD),
        seg.Record(seg.RecordType.CHUNK, 2, 20, b"\x03" * 32),
        seg.Record(seg.RecordType.TXN, 2, 20, b"", seg.FLAG_ENCRYPTED),
    ]
    recs.append(seg.Record(seg.RecordType.SEAL, 2, 30, seg.seal_payload(len(recs), 2)))
    buf = _header().pack()
    ends = []
    for r in recs:
        buf += seg.encode_record(r)
        ends.append(len(buf))
    return buf, recs, ends


def _flip(buf: bytes, bit: int) -> bytes:
    b = bytearray(buf)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# -- records -------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(records_st)
def test_record_round_trip(rec: seg.Record) -> None:
    raw = seg.encode_record(rec)
    assert len(raw) == rec.size == seg.RECORD_OVERHEAD + len(rec.payload)
    assert seg.decode_record(raw) == rec
    assert seg.decode_record(memoryview(raw)) == rec


@settings(max_examples=100, deadline=None)
@given(records_st)
def test_record_layout_matches_format_doc(rec: seg.Record) -> None:
    raw = seg.encode_record(rec)
    length, rtype, flags, reserved, lsn, time_ns = struct.unpack_from("<IBBHQQ", raw)
    assert (length, rtype, flags, reserved, lsn, time_ns) == (
        len(rec.payload),
        int(rec.type),
        rec.flags,
        0,
        rec.lsn,
        rec.time_ns,
    )
    assert raw[24 : 24 + length] == rec.payload
    (crc,) = struct.unpack_from("<I", raw, 24 + length)
    assert crc == zlib.crc32(raw[: 24 + length])


@settings(max_examples=100, deadline=None)
@given(st.lists(body_records_st, max_size=8), st.booleans())
def test_segment_round_trip(recs: list[seg.Record], sealed: bool) -> None:
    all_recs = list(recs)
    if sealed:
        all_recs.append(seg.Record(seg.RecordType.SEAL, 5, 6, seg.seal_payload(len(recs), 5)))
    buf = _header(3).pack() + b"".join(seg.encode_record(r) for r in all_recs)
    scan = seg.scan_segment(buf)
    assert scan.header == _header(3)
    assert [r for _, r in scan.records] == all_recs
    assert scan.end == len(buf)
    assert scan.stop_reason is None
    assert scan.sealed is sealed
    offsets = [off for off, _ in scan.records]
    expected, off = [], seg.HEADER_SIZE
    for r in all_recs:
        expected.append(off)
        off += r.size
    assert offsets == expected
    assert list(seg.iter_records(buf)) == scan.records


def test_decode_record_rejects_trailing_bytes() -> None:
    raw = seg.encode_record(seg.Record(seg.RecordType.TXN, 1, 1, b"x"))
    with pytest.raises(CorruptRecordError, match="trailing"):
        seg.decode_record(raw + b"\0")


@pytest.mark.parametrize("cut", range(seg.RECORD_OVERHEAD + 5))
def test_decode_record_rejects_truncation(cut: int) -> None:
    raw = seg.encode_record(seg.Record(seg.RecordType.CHUNK, 9, 9, b"hello"))
    assert len(raw) == seg.RECORD_OVERHEAD + 5
    with pytest.raises(CorruptRecordError):
        seg.decode_record(raw[:cut])


def test_every_single_bit_flip_in_a_record_is_detected() -> None:
    rec = seg.Record(seg.RecordType.TXN, 42, 1234, b'{"v":1,"ops":[{"op":"drop_inode"}]}')
    raw = seg.encode_record(rec)
    for bit in range(len(raw) * 8):
        with pytest.raises(CorruptRecordError):
            seg.decode_record(_flip(raw, bit))


def test_every_single_bit_flip_in_a_segment_stops_the_scan_there() -> None:
    buf, recs, ends = _small_segment()
    starts = [seg.HEADER_SIZE, *ends[:-1]]
    for bit in range(len(buf) * 8):
        bad = _flip(buf, bit)
        byte = bit // 8
        if byte < seg.HEADER_SIZE:
            # Bad magic, a version that now reads as newer, or a checksum mismatch.
            with pytest.raises(FormatError):
                seg.scan_segment(bad)
            continue
        k = next(i for i, end in enumerate(ends) if byte < end)
        scan = seg.scan_segment(bad)
        assert [r for _, r in scan.records] == recs[:k], f"bit {bit}"
        assert scan.end == starts[k]
        assert scan.stop_reason is not None
        assert not scan.sealed
        assert [r for _, r in seg.iter_records(bad)] == recs[:k]


# -- torn tails ------------------------------------------------------------------


def test_torn_tail_at_every_truncation_point() -> None:
    buf, recs, ends = _small_segment()
    for cut in range(len(buf) + 1):
        torn = buf[:cut]
        if cut < seg.HEADER_SIZE:
            with pytest.raises(CorruptRecordError, match="shorter than a segment header"):
                seg.scan_segment(torn)
            continue
        whole = [i for i, end in enumerate(ends) if end <= cut]
        scan = seg.scan_segment(torn)
        assert [r for _, r in scan.records] == [recs[i] for i in whole]
        assert scan.end == (ends[whole[-1]] if whole else seg.HEADER_SIZE)
        assert scan.end <= cut
        # A cut at a record boundary is not damage; anywhere else it says why it stopped.
        assert (scan.stop_reason is None) == (cut == scan.end)
        if scan.stop_reason is not None:
            assert "incomplete" in scan.stop_reason
            assert f"offset {scan.end}" in scan.stop_reason
        assert scan.sealed == (cut == len(buf))
        # Cutting at `end` leaves a clean prefix that scans identically.
        again = seg.scan_segment(torn[: scan.end])
        assert again.records == scan.records
        assert again.stop_reason is None


def test_zero_filled_tail_is_not_a_record() -> None:
    buf, recs, _ = _small_segment()
    body = buf[: -len(seg.encode_record(recs[-1]))]
    scan = seg.scan_segment(body + b"\0" * 4096)
    assert [r for _, r in scan.records] == recs[:-1]
    assert scan.end == len(body)
    assert scan.stop_reason == f"record checksum mismatch at offset {len(body)}"


def test_bytes_after_seal_are_reported() -> None:
    buf, recs, _ = _small_segment()
    scan = seg.scan_segment(buf + seg.encode_record(recs[0]))
    assert scan.sealed
    assert scan.end == len(buf)
    assert [r for _, r in scan.records] == recs
    assert scan.stop_reason is not None and "after the seal" in scan.stop_reason
    # iter_records stops at the seal too.
    assert [r for _, r in seg.iter_records(buf + seg.encode_record(recs[0]))] == recs


def test_seal_with_wrong_count_is_corrupt() -> None:
    rec = seg.encode_record(seg.Record(seg.RecordType.TXN, 1, 1, b"{}"))
    seal = seg.encode_record(seg.Record(seg.RecordType.SEAL, 1, 1, seg.seal_payload(2, 1)))
    with pytest.raises(CorruptRecordError, match="seal says 2 records but 1"):
        seg.scan_segment(_header().pack() + rec + seal, "seg-x")


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), U64)
def test_seal_payload_round_trip(count: int, last: int) -> None:
    payload = seg.seal_payload(count, last)
    assert len(payload) == 12
    assert seg.parse_seal(payload) == (count, last)


@pytest.mark.parametrize("size", [0, 11, 13])
def test_parse_seal_wrong_size(size: int) -> None:
    with pytest.raises(CorruptRecordError):
        seg.parse_seal(b"\0" * size)


# -- newer writers are refused, not skipped ----------------------------------------


def _raw_record(rtype: int, flags: int, reserved: int = 0, payload: bytes = b"p") -> bytes:
    head = struct.pack("<IBBHQQ", len(payload), rtype, flags, reserved, 1, 1)
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


@pytest.mark.parametrize(
    ("rtype", "flags", "reserved"),
    [(0, 0, 0), (5, 0, 0), (255, 0, 0), (2, 0x08, 0), (1, 0x80, 0), (2, 0, 1)],
)
def test_unknown_type_flags_or_reserved_are_refused(rtype: int, flags: int, reserved: int) -> None:
    raw = _raw_record(rtype, flags, reserved)
    with pytest.raises(NewerFormatError, match="newer vaultsync"):
        seg.decode_record(raw)
    good = seg.encode_record(seg.Record(seg.RecordType.TXN, 1, 1, b"{}"))
    # In a scan, too: it must not be mistaken for a torn tail and silently cut.
    with pytest.raises(NewerFormatError):
        seg.scan_segment(_header().pack() + good + raw)


def test_oversized_payload_is_refused() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return seg.MAX_PAYLOAD + 1

    with pytest.raises(ValueError, match="4 GiB"):
        seg.encode_record(seg.Record(seg.RecordType.CHUNK, 1, 1, Huge(b"")))


# -- segment header ----------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=16, max_size=16), U64, U64, U64)
def test_segment_header_round_trip(vid: bytes, segno: int, epoch: int, created: int) -> None:
    h = seg.SegmentHeader(vid, segno, epoch, created)
    raw = h.pack()
    assert len(raw) == seg.HEADER_SIZE == 64
    assert seg.SegmentHeader.unpack(raw) == h
    # Layout from docs/format.md §4.1.
    assert raw[:8] == b"VSSEGMNT"
    assert struct.unpack_from("<HHI", raw, 8) == (1, 64, 0)
    assert raw[16:32] == vid
    assert struct.unpack_from("<QQQI", raw, 32) == (segno, epoch, created, 0)
    assert struct.unpack_from("<I", raw, 60)[0] == zlib.crc32(raw[:60])


def _repack_header(raw: bytes, **fields: int | bytes) -> bytes:
    names = ["magic", "version", "size", "flags", "vid", "segno", "epoch", "created", "res"]
    values = dict(zip(names, struct.unpack_from("<8sHHI16sQQQI", raw), strict=True))
    values.update(fields)
    body = struct.pack("<8sHHI16sQQQI", *values.values())
    return body + struct.pack("<I", zlib.crc32(body))


def test_bad_magic_is_refused_clearly() -> None:
    raw = _repack_header(_header().pack(), magic=b"PK\x03\x04abc")
    with pytest.raises(FormatError, match="not a vaultsync segment") as ei:
        seg.SegmentHeader.unpack(raw, "bucket/segments/1.seg")
    assert "bucket/segments/1.seg" in str(ei.value)
    assert not isinstance(ei.value, NewerFormatError | CorruptRecordError)


def test_newer_segment_version_is_refused_with_upgrade_hint() -> None:
    raw = _repack_header(_header().pack(), version=2)
    with pytest.raises(NewerFormatError, match="upgrade vaultsync") as ei:
        seg.SegmentHeader.unpack(raw, "seg-1")
    assert "version 2" in str(ei.value)
    with pytest.raises(NewerFormatError):
        seg.scan_segment(raw + seg.encode_record(seg.Record(seg.RecordType.TXN, 1, 1, b"")))


@pytest.mark.parametrize(("field", "value"), [("flags", 1), ("size", 128), ("size", 60)])
def test_unsupported_header_fields(field: str, value: int) -> None:
    raw = _repack_header(_header().pack(), **{field: value})
    with pytest.raises(FormatError, match="unsupported segment header"):
        seg.SegmentHeader.unpack(raw)


def test_header_checksum_mismatch() -> None:
    raw = bytearray(_header().pack())
    raw[40] ^= 0x10  # epoch
    with pytest.raises(CorruptRecordError, match="checksum"):
        seg.SegmentHeader.unpack(bytes(raw))


def test_crc32_is_zlib_crc32() -> None:
    # The check value of CRC-32/ISO-HDLC.
    assert seg.crc32(b"123456789") == 0xCBF43926
    assert seg.crc32(memoryview(b"123456789")) == 0xCBF43926
