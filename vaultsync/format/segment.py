"""Segment framing: the byte layout shared by the local journal and the buckets.

A segment is a 64-byte header followed by records. Each record ends with a
CRC-32 of itself, so a reader walking forward stops at the first record that
is incomplete or damaged and knows that everything before it is intact. That
is what makes the journal crash-safe: appends only ever extend the file, and
a torn append fails its own checksum (docs/format.md has the full contract).

Pure: bytes in, values out. File and network I/O live in journal.py and the
object-store layer.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from vaultsync.errors import CorruptRecordError, FormatError, NewerFormatError

SEGMENT_MAGIC = b"VSSEGMNT"
SEGMENT_VERSION = 1

# magic, version, header_size, flags, volume_id, segment_no, epoch, created_ns, reserved
_HEADER = struct.Struct("<8sHHI16sQQQI")
HEADER_SIZE = _HEADER.size + 4  # + CRC-32
assert HEADER_SIZE == 64

# payload_length, type, flags, reserved, lsn, time_ns
_RECORD = struct.Struct("<IBBHQQ")
RECORD_HEADER_SIZE = _RECORD.size
_CRC = struct.Struct("<I")
RECORD_OVERHEAD = RECORD_HEADER_SIZE + _CRC.size
MAX_PAYLOAD = (1 << 32) - 1

_SEAL = struct.Struct("<IQ")  # record_count (excluding the seal), last_lsn


class RecordType(IntEnum):
    CHUNK = 1  # payload: 32-byte chunk id, then the stored chunk bytes
    TXN = 2  # payload: one metadata transaction (txn.py)
    SEAL = 3  # payload: record count and last LSN; the segment ends here
    CHECKPOINT = 4  # payload: a catalog image; only in checkpoint objects, never in segments


FLAG_ZSTD = 0x01
FLAG_ENCRYPTED = 0x02
# CHUNK records only: the payload is a patch of another chunk (docs/format.md §6.3);
# the base's 32-byte id follows the chunk's own id, in the clear.
FLAG_PATCH = 0x04
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_ENCRYPTED | FLAG_PATCH
CHUNK_ID_SIZE = 32


def crc32(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class SegmentHeader:
    volume_id: bytes
    segment_no: int
    epoch: int
    created_ns: int

    def pack(self) -> bytes:
        body = _HEADER.pack(
            SEGMENT_MAGIC,
            SEGMENT_VERSION,
            HEADER_SIZE,
            0,
            self.volume_id,
            self.segment_no,
            self.epoch,
            self.created_ns,
            0,
        )
        return body + _CRC.pack(crc32(body))

    @classmethod
    def unpack(cls, buf: bytes | memoryview, where: str = "segment") -> SegmentHeader:
        if len(buf) < HEADER_SIZE:
            raise CorruptRecordError(f"{where}: shorter than a segment header ({len(buf)} bytes)")
        magic, version, size, flags, vid, segno, epoch, created, _ = _HEADER.unpack_from(buf)
        if magic != SEGMENT_MAGIC:
            raise FormatError(f"{where}: not a vaultsync segment (bad magic)")
        if version > SEGMENT_VERSION:
            raise NewerFormatError(
                f"{where}: segment format version {version} is newer than this vaultsync "
                f"reads ({SEGMENT_VERSION}); upgrade vaultsync"
            )
        (stored_crc,) = _CRC.unpack_from(buf, _HEADER.size)
        if crc32(buf[: _HEADER.size]) != stored_crc:
            raise CorruptRecordError(f"{where}: segment header checksum mismatch")
        if size != HEADER_SIZE or flags != 0:
            raise FormatError(f"{where}: unsupported segment header (size {size}, flags {flags})")
        return cls(volume_id=vid, segment_no=segno, epoch=epoch, created_ns=created)


@dataclass(frozen=True)
class Record:
    type: RecordType
    lsn: int
    time_ns: int
    payload: bytes
    flags: int = 0

    @property
    def size(self) -> int:
        return RECORD_OVERHEAD + len(self.payload)


def record_parts(rec: Record) -> tuple[bytes, bytes, bytes]:
    """A record's header, payload and checksum, to be written one after the other
    (a vectored write stores a big payload without copying it into one buffer)."""
    if len(rec.payload) > MAX_PAYLOAD:
        raise ValueError("record payload larger than 4 GiB")
    head = _RECORD.pack(len(rec.payload), rec.type, rec.flags, 0, rec.lsn, rec.time_ns)
    crc = zlib.crc32(rec.payload, zlib.crc32(head)) & 0xFFFFFFFF
    return head, rec.payload, _CRC.pack(crc)


def encode_record(rec: Record) -> bytes:
    return b"".join(record_parts(rec))


def patch_base(rec: Record) -> bytes | None:
    """The id of the chunk a CHUNK record patches, or None for a whole chunk."""
    if rec.flags & FLAG_PATCH:
        return rec.payload[CHUNK_ID_SIZE : 2 * CHUNK_ID_SIZE]
    return None


def seal_payload(record_count: int, last_lsn: int) -> bytes:
    return _SEAL.pack(record_count, last_lsn)


def parse_seal(payload: bytes) -> tuple[int, int]:
    if len(payload) != _SEAL.size:
        raise CorruptRecordError("seal record has the wrong size")
    count, last = _SEAL.unpack(payload)
    return int(count), int(last)


class _Stop(Exception):
    """Internal: the record at this offset is not a whole, valid record."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decode_at(buf: memoryview, off: int) -> Record:
    if len(buf) - off < RECORD_OVERHEAD:
        raise _Stop("incomplete record header")
    length, rtype, flags, reserved, lsn, time_ns = _RECORD.unpack_from(buf, off)
    end = off + RECORD_HEADER_SIZE + length
    if end + _CRC.size > len(buf):
        raise _Stop("incomplete record")
    (stored,) = _CRC.unpack_from(buf, end)
    if crc32(buf[off:end]) != stored:
        raise _Stop("record checksum mismatch")
    # The checksum passed: anything unknown now is a newer writer, not damage.
    if rtype not in RecordType._value2member_map_:
        raise NewerFormatError(
            f"unknown record type {rtype}: written by a newer vaultsync; upgrade to read it"
        )
    if flags & ~_KNOWN_FLAGS or reserved:
        raise NewerFormatError(f"unknown record flags {flags:#x}: written by a newer vaultsync")
    if flags & FLAG_PATCH and (rtype != RecordType.CHUNK or length < 2 * CHUNK_ID_SIZE):
        raise CorruptRecordError("a patch flag on a record that cannot be a patch")
    return Record(
        type=RecordType(rtype),
        lsn=lsn,
        time_ns=time_ns,
        payload=bytes(buf[off + RECORD_HEADER_SIZE : end]),
        flags=flags,
    )


SEAL_RECORD_SIZE = RECORD_OVERHEAD + _SEAL.size


def seal_at_end(tail: bytes | memoryview) -> int | None:
    """The last LSN if `tail` (a segment's last SEAL_RECORD_SIZE bytes) is an intact SEAL.

    Lets a reader skip a whole sealed segment it knows it does not need
    without reading it. It proves nothing about the records before the seal:
    whoever reads those still checks each one.
    """
    if len(tail) != SEAL_RECORD_SIZE:
        return None
    try:
        rec = _decode_at(memoryview(tail), 0)
    except (_Stop, FormatError):
        return None
    if rec.type is not RecordType.SEAL or rec.size != SEAL_RECORD_SIZE:
        return None
    return parse_seal(rec.payload)[1]


def decode_record(buf: bytes | memoryview, where: str = "record") -> Record:
    """One record that must be whole and intact (a ranged read of a known record)."""
    mv = memoryview(buf)
    try:
        rec = _decode_at(mv, 0)
    except _Stop as s:
        raise CorruptRecordError(f"{where}: {s.reason}") from None
    if rec.size != len(mv):
        raise CorruptRecordError(f"{where}: {len(mv) - rec.size} trailing bytes after the record")
    return rec


@dataclass
class ScanResult:
    """What a forward walk over a segment found.

    `end` is the offset just past the last intact record; `stop_reason` says
    why the walk stopped before the end of the buffer (None if it did not).
    """

    header: SegmentHeader
    records: list[tuple[int, Record]] = field(default_factory=list)
    end: int = HEADER_SIZE
    stop_reason: str | None = None
    sealed: bool = False


def iter_records(buf: bytes | memoryview, start: int = HEADER_SIZE) -> Iterator[tuple[int, Record]]:
    """Intact records from `start`; stops silently at the first bad one (see scan_segment)."""
    mv = memoryview(buf)
    off = start
    while off < len(mv):
        try:
            rec = _decode_at(mv, off)
        except _Stop:
            return
        yield off, rec
        off += rec.size
        if rec.type is RecordType.SEAL:
            return


def scan_segment(buf: bytes | memoryview, where: str = "segment") -> ScanResult:
    """Walk a whole segment. Never returns a record that failed its checksum.

    Damage and a torn tail look the same here; the caller decides which it is:
    the open local segment may be cut at `end`, a sealed or shipped one may not.
    """
    mv = memoryview(buf)
    result = ScanResult(header=SegmentHeader.unpack(mv, where))
    off = HEADER_SIZE
    while off < len(mv):
        try:
            rec = _decode_at(mv, off)
        except _Stop as s:
            result.stop_reason = f"{s.reason} at offset {off}"
            break
        result.records.append((off, rec))
        off += rec.size
        result.end = off
        if rec.type is RecordType.SEAL:
            count, _ = parse_seal(rec.payload)
            if count != len(result.records) - 1:
                raise CorruptRecordError(
                    f"{where}: seal says {count} records but {len(result.records) - 1} precede it"
                )
            result.sealed = True
            if off != len(mv):
                result.stop_reason = f"{len(mv) - off} bytes after the seal record"
            break
    return result


def is_complete_segment(data: bytes, volume_id: bytes, segno: int) -> bool:
    """A whole sealed segment of this volume with this number, every checksum right."""
    try:
        scan = scan_segment(data, f"segment {segno}")
    except FormatError:
        return False
    h = scan.header
    return bool(
        scan.sealed
        and scan.stop_reason is None
        and h.volume_id == volume_id
        and h.segment_no == segno
    )


# A SEAL record is always this long, so a reader can fetch just the end of a segment.
SEAL_RECORD_SIZE = RECORD_OVERHEAD + _SEAL.size
