"""The local journal: append-only segment files under `journal/`.

Invariants (kept by this module, relied on by volume.py and the shippers):

1. Only the newest file is open for appends; every older file ends with a SEAL
   record and never changes again.
2. A file's header is fsynced, and the directory too, before any record goes in,
   so a segment that exists on disk always has an intact header, except the
   newest one if the crash hit between create and that fsync.
3. A transaction is committed once its TXN record is on disk: CHUNK records
   precede the TXN record that uses them, so a crash can only leave chunk
   records of an uncommitted transaction after the last TXN. Recovery cuts the
   newest file back to the end of its last TXN or SEAL record; what it removes
   was never acknowledged.

4. The open segment's file may extend past `size` with zeros (the runway,
   see `_extend_runway`); every other file ends exactly at its last record.
   Zeros never parse as a record, so to a reader they are a torn tail.

Synchronous file I/O on purpose: callers decide which thread runs it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vaultsync.errors import CorruptRecordError, FormatError, VolumeError
from vaultsync.format import segment as seg


def segment_name(segno: int) -> str:
    return f"{segno:016x}.seg"


IOV_MAX = 1024


def _pwrite_all(fd: int, parts: list[bytes], at: int) -> None:
    """Write the buffers one after another from `at`, without joining them first."""
    for i in range(0, len(parts), IOV_MAX):
        group = parts[i : i + IOV_MAX]
        want = sum(len(p) for p in group)
        n = os.pwritev(fd, group, at)
        if n < want:  # short write (a full disk reports ENOSPC on the retry)
            rest = memoryview(b"".join(group))[n:]
            while rest:
                k = os.pwrite(fd, rest, at + n)
                rest, n = rest[k:], n + k
        at += want


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class RecoveryReport:
    """What opening the journal had to repair; empty after a clean shutdown."""

    cut_bytes: int = 0  # torn or uncommitted tail removed from the newest segment
    cut_reason: str | None = None
    removed_empty: int = 0  # newest segment files dropped because their header was torn


@dataclass(frozen=True)
class Location:
    segno: int
    offset: int
    length: int


class Journal:
    def __init__(self, directory: Path, volume_id: bytes, epoch: int) -> None:
        self.dir = directory
        self.volume_id = volume_id
        self.epoch = epoch
        self._fd = -1
        self.segno = 0  # the open segment
        self.size = 0  # bytes in the open segment
        self.records = 0  # records in the open segment
        self.last_lsn = 0  # newest committed LSN anywhere in the journal
        self.first_lsn: int | None = None  # oldest LSN in the open segment
        self.opened_at = time.monotonic()
        self.dirty = False  # appended since the last fsync
        # Sealed segments' descriptors whose fsync is still owed (see seal()).
        self._owed: list[int] = []
        self._dir_dirty = False
        self._runway_end = 0  # the open file holds zeros from `size` up to here
        self._synced_size = 0  # `size` when the last sync took its work

    # -- opening and recovery --------------------------------------------
    @classmethod
    def open(
        cls,
        directory: Path,
        volume_id: bytes,
        epoch: int = 0,
        expect_lsn: int = 0,
        sealed_last: dict[int, int] | None = None,
    ) -> tuple[Journal, RecoveryReport]:
        """Open for appending, repairing a torn tail.

        `expect_lsn` is the newest LSN the catalog has applied: the journal
        must hold it, or something other than a crash damaged the journal, and
        cutting would throw away acknowledged transactions. Then we refuse.
        """
        directory.mkdir(parents=True, exist_ok=True)
        j = cls(directory, volume_id, epoch)
        report = RecoveryReport()
        segnos = j.segment_numbers()
        # A newest file no longer than a header that does not verify was being created
        # when we crashed (invariant 2): nothing was ever appended to it. A longer one
        # with a bad header is damage, and we never delete damage.
        while segnos:
            path = j.path(segnos[-1])
            with path.open("rb") as f:
                head = f.read(seg.HEADER_SIZE + 1)
            try:
                seg.SegmentHeader.unpack(head[: seg.HEADER_SIZE], str(path))
                break
            except FormatError:
                if len(head) > seg.HEADER_SIZE:
                    raise CorruptRecordError(
                        f"{path}: the segment header is damaged but records follow it; "
                        "nothing was changed. Restore the state directory from a target"
                    ) from None
                path.unlink()
                report.removed_empty += 1
                segnos.pop()
        if not segnos:
            if expect_lsn:
                raise CorruptRecordError(
                    f"{directory}: the journal is empty but the catalog has applied LSN "
                    f"{expect_lsn}; restore the state directory from a target"
                )
            j._create(1)
            return j, report
        last = segnos[-1]
        path = j.path(last)
        sealed_lsn = j._seal_at_end(last)
        if sealed_lsn is not None and sealed_lsn >= expect_lsn:
            # A clean unmount sealed it: no tail to repair, and nothing to read of it.
            j.last_lsn = sealed_lsn
            j._create(last + 1)
            return j, report
        buf = path.read_bytes()
        scan = seg.scan_segment(buf, str(path))
        j._check_header(scan.header, path)
        committed_end = seg.HEADER_SIZE
        count = 0
        for i, (off, rec) in enumerate(scan.records):
            if rec.type in (seg.RecordType.TXN, seg.RecordType.SEAL):
                if j.first_lsn is None and rec.type is seg.RecordType.TXN:
                    j.first_lsn = rec.lsn
                committed_end = off + rec.size
                count = i + 1
                j.last_lsn = max(j.last_lsn, rec.lsn)
        if j.last_lsn == 0 and last > 1:
            # The newest segment holds no transaction yet: the previous one's seal
            # says where history stands (or the catalog does, if that file was lost
            # and is to be read back from a target).
            if j.path(last - 1).exists():
                j.last_lsn = j._sealed_last_lsn(last - 1)
            elif sealed_last and last - 1 in sealed_last:
                j.last_lsn = sealed_last[last - 1]
        if j.last_lsn < expect_lsn:
            raise CorruptRecordError(
                f"{path}: the journal ends at LSN {j.last_lsn} "
                f"({scan.stop_reason or 'no damage seen'}) "
                f"but the catalog has applied LSN {expect_lsn}; the journal was damaged. "
                "Nothing was changed; restore the state directory from a target "
                "(vaultsync promote) or contact support"
            )
        if committed_end < len(buf):
            # Nothing but zeros after the records is the runway of a process that died
            # (invariant 4), not a torn tail: no data is lost by cutting it.
            if any(buf[committed_end:]):
                report.cut_bytes = len(buf) - committed_end
                report.cut_reason = (
                    scan.stop_reason or "uncommitted chunk records after the last transaction"
                )
            with path.open("r+b") as f:
                f.truncate(committed_end)
                os.fsync(f.fileno())
        if scan.sealed:
            j._create(last + 1)
        else:
            j.segno, j.size, j.records = last, committed_end, count
            j._fd = os.open(path, os.O_RDWR)  # read too: `read_range`
            j._runway_end = j._synced_size = committed_end
        return j, report

    def _check_header(self, h: seg.SegmentHeader, path: Path) -> None:
        if h.volume_id != self.volume_id:
            raise VolumeError(
                f"{path} belongs to volume {h.volume_id.hex()}, not {self.volume_id.hex()}: "
                "the state directory holds another volume's journal"
            )

    def _seal_at_end(self, segno: int) -> int | None:
        """The last LSN of a segment whose file ends in an intact SEAL (read: its end only)."""
        try:
            with self.path(segno).open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size < seg.HEADER_SIZE + seg.SEAL_RECORD_SIZE:
                    return None
                f.seek(size - seg.SEAL_RECORD_SIZE)
                return seg.seal_at_end(f.read(seg.SEAL_RECORD_SIZE))
        except OSError:
            return None

    def _sealed_last_lsn(self, segno: int) -> int:
        buf = self.path(segno).read_bytes()
        scan = seg.scan_segment(buf, str(self.path(segno)))
        if not scan.sealed:
            raise CorruptRecordError(f"{self.path(segno)}: older segment is not sealed")
        return seg.parse_seal(scan.records[-1][1].payload)[1]

    def _create(self, segno: int, durable: bool = True) -> None:
        path = self.path(segno)
        header = seg.SegmentHeader(self.volume_id, segno, self.epoch, time.time_ns()).pack()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if os.write(fd, header) != len(header):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            if durable:
                os.fsync(fd)
        except BaseException:
            # Nothing was appended to it: gone again, the journal is as it was and a
            # later attempt (after a full disk, say) can create it afresh.
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        if durable:
            _fsync_dir(self.dir)
        else:
            self._dir_dirty = True
        self._fd = fd
        self.segno, self.size, self.records = segno, len(header), 0
        self._runway_end = self._synced_size = len(header)
        self.first_lsn = None
        self.opened_at = time.monotonic()
        self.dirty = not durable

    # -- paths and listing -------------------------------------------------
    def path(self, segno: int) -> Path:
        return self.dir / segment_name(segno)

    def segment_numbers(self) -> list[int]:
        out = []
        for p in self.dir.glob("*.seg"):
            with contextlib.suppress(ValueError):
                out.append(int(p.stem, 16))
        return sorted(out)

    # -- writing -------------------------------------------------------------
    def append(self, records: list[seg.Record]) -> list[Location]:
        """Write records at the end of the open segment (no fsync: see sync())."""
        if self._fd < 0:
            raise VolumeError("journal is closed")
        parts: list[bytes] = []
        locs = []
        off = self.size
        for r in records:
            parts.extend(seg.record_parts(r))
            locs.append(Location(self.segno, off, r.size))
            off += r.size
        try:
            _pwrite_all(self._fd, parts, self.size)
        except OSError:
            # Part of the records may be on disk past `size` (a full disk): not
            # committed, overwritten by the next append or cut on open. No longer zeros.
            self._runway_end = min(self._runway_end, self.size)
            raise
        self.size = off
        self.records += len(records)
        for r in records:
            if r.type is seg.RecordType.TXN:
                self.last_lsn = max(self.last_lsn, r.lsn)
                if self.first_lsn is None:
                    self.first_lsn = r.lsn
        self.dirty = True
        return locs

    def sync_work(self) -> Callable[[], None]:
        """Take what is owed to the disk now; return the blocking part, to run in a thread.

        Called on the thread that appends. Everything appended before the call
        is durable once the returned function has returned: the open segment,
        segments sealed since the last sync (their descriptors are closed only
        after their fsync), and the directory entries of new segment files.
        Only one returned function may run at a time (volume.py serialises).
        """
        owed, self._owed = self._owed, []
        fd = self._fd if self.dirty else -1
        if fd >= 0:
            if self.records and self.size - self._synced_size <= self.RUNWAY_SMALL_SYNC:
                self._extend_runway()
            self._synced_size = self.size
        dir_dirty, self._dir_dirty = self._dir_dirty, False
        self.dirty = False

        def work() -> None:
            for old in owed:
                os.fsync(old)
                os.close(old)
            if fd >= 0:
                os.fdatasync(fd)
            if dir_dirty:
                _fsync_dir(self.dir)

        return work

    # Small syncs (a 4 KiB write + fsync, a file create) go faster into file space
    # that already exists: ext4's fdatasync of an append must also log the new size
    # (measured here: 0.44 ms against 0.16 ms to overwrite written blocks), so such
    # syncs write zeros a stretch ahead. Large writes skip it: it would double their I/O.
    RUNWAY = 1 << 20
    RUNWAY_SMALL_SYNC = 256 * 1024
    _ZEROS = bytes(RUNWAY)

    def _extend_runway(self) -> None:
        """Zero-fill ahead of `size`; on the appending thread, so no append can race it."""
        if self._runway_end - self.size >= self.RUNWAY // 2:
            return
        start = max(self._runway_end, self.size)
        end = self.size + self.RUNWAY
        view, at = memoryview(self._ZEROS)[: end - start], start
        try:
            while view:
                n = os.pwrite(self._fd, view, at)
                view, at = view[n:], at + n
        except OSError:
            # A full disk: the runway only speeds syncs up, and the sync that asked
            # for it must not fail for it. Whatever zeros did land stay usable.
            self._runway_end = max(self._runway_end, at)
            return
        self._runway_end = end
        # Allocating and writing the zeros is the slow part: have it done now, off to
        # the side, rather than by the next caller's fdatasync. Durability claims never
        # rest on this (sync_work's fdatasync makes them); it only moves the cost.
        # Its own open file description, not a dup: Linux reports a writeback error
        # once per description, and this one must not take it from the journal's.
        own = os.open(self.path(self.segno), os.O_WRONLY)

        def settle() -> None:
            try:
                os.fdatasync(own)
            except OSError:
                pass  # the journal's own description still reports it at its next sync
            finally:
                os.close(own)

        threading.Thread(target=settle, name="journal-runway", daemon=True).start()

    def _cut_runway(self) -> None:
        """The file ends at its last record again (before a seal's fsync, or a close)."""
        if self._runway_end > self.size:
            os.ftruncate(self._fd, self.size)
        self._runway_end = self.size

    # A sync owing no more than this, all of it inside the runway, is one quick
    # fdatasync of an overwrite (about 0.1 ms here): cheaper done where it is asked
    # for than handed to a thread, whose wake-up alone cost 0.1-0.3 ms here.
    INLINE_SYNC = 128 * 1024

    @property
    def small_sync(self) -> bool:
        """What a sync owes now is only a short stretch of the open segment's runway."""
        return (
            not self._owed
            and not self._dir_dirty
            and self.size - self._synced_size <= self.INLINE_SYNC
            and self.size <= self._runway_end
        )

    @property
    def needs_sync(self) -> bool:
        return self.dirty or bool(self._owed) or self._dir_dirty

    def sync(self) -> None:
        self.sync_work()()

    def sealed_info(self, segno: int) -> tuple[int | None, int, int]:
        """(first LSN, last LSN, size) of a sealed segment, read from its file."""
        path = self.path(segno)
        buf = path.read_bytes()
        scan = seg.scan_segment(buf, str(path))
        if not scan.sealed:
            raise CorruptRecordError(f"{path}: older segment is not sealed")
        first = next((r.lsn for _, r in scan.records if r.type is seg.RecordType.TXN), None)
        return first, seg.parse_seal(scan.records[-1][1].payload)[1], len(buf)

    def seal(self) -> tuple[int, int | None, int]:
        """Close the open segment for good and start the next, without waiting for the disk.

        Returns the sealed segment's number, first LSN and size. Its fsync is
        owed to the next sync(); only after that may it count as sealed for
        upload (volume.py notes it in the catalog then).
        """
        sealed, first, old_fd, before = self.segno, self.first_lsn, self._fd, self.size
        payload = seg.seal_payload(self.records, self.last_lsn)
        self.append([seg.Record(seg.RecordType.SEAL, self.last_lsn, time.time_ns(), payload)])
        self._cut_runway()
        size = self.size
        try:
            self._create(sealed + 1, durable=False)
        except OSError:
            # No room for the next file (a full disk): take the seal back, so that the
            # segment stays open for appends and a later seal tries again. Cutting a
            # file needs no space. Should we die before, open() finds a sealed newest
            # segment and starts the next one itself: both states are whole.
            os.ftruncate(old_fd, before)
            self.size = self._runway_end = before
            self.records -= 1
            raise
        self._owed.append(old_fd)
        return sealed, first, size

    def close(self) -> None:
        if self._fd >= 0 or self._owed:
            self.sync()
        if self._fd >= 0:
            # Not synced: should the cut be lost, open() treats the zeros as runway.
            self._cut_runway()
            os.close(self._fd)
            self._fd = -1

    # -- reading ---------------------------------------------------------------
    def read(self, loc: Location) -> seg.Record:
        with self.path(loc.segno).open("rb") as f:
            f.seek(loc.offset)
            buf = f.read(loc.length)
        return seg.decode_record(buf, f"{self.path(loc.segno)}@{loc.offset}")

    def read_range(self, segno: int, start: int, end: int | None) -> bytes:
        """Bytes `start`..`end` (None: to the end) of a segment file: of the open one
        through the journal's own descriptor (one pread, where a tail upload after
        every fsync would otherwise open the file each time)."""
        if segno == self.segno and self._fd >= 0 and end is not None:
            return os.pread(self._fd, end - start, start)
        with open(self.path(segno), "rb") as f:
            f.seek(start)
            return f.read(-1 if end is None else end - start)

    def read_if_cached(self, loc: Location) -> seg.Record | None:
        """The record, if every byte of it is in the page cache; None otherwise.

        `RWF_NOWAIT` makes the read fail rather than wait for the disk, so the event
        loop can take a hot record itself (a thread hand-off costs more than the
        read here) and leave a cold one to a worker thread.
        """
        buf = bytearray(loc.length)
        try:
            fd = os.open(self.path(loc.segno), os.O_RDONLY)
        except OSError:
            return None
        try:
            n = os.preadv(fd, [buf], loc.offset, os.RWF_NOWAIT)
        except OSError:  # EAGAIN (not cached), or a filesystem without RWF_NOWAIT
            return None
        finally:
            os.close(fd)
        if n != loc.length:
            return None
        return seg.decode_record(bytes(buf), f"{self.path(loc.segno)}@{loc.offset}")

    def iter_committed(self, after_lsn: int = 0) -> Iterator[tuple[Location, seg.Record]]:
        """Every intact record of committed transactions with LSN > after_lsn, in order.

        Recovery has already cut uncommitted tails, so each CHUNK yielded here
        is followed by the TXN that commits it.
        """
        segnos = self.segment_numbers()
        expect: int | None = None
        for segno in segnos:
            path = self.path(segno)
            if segno != segnos[-1]:
                last = self._seal_at_end(segno)
                if last is not None and last <= after_lsn:
                    continue  # wholly applied: a mount need not read the whole journal
            buf = path.read_bytes()
            scan = seg.scan_segment(buf, str(path))
            if scan.header.volume_id != self.volume_id:
                raise FormatError(f"{path}: foreign segment in the journal")
            # Only the newest segment may end early (its tail was cut on open); a
            # sealed one that does not verify to its seal must not be half-used.
            if segno != segnos[-1] and (not scan.sealed or scan.stop_reason):
                raise CorruptRecordError(
                    f"{path}: sealed segment is damaged ({scan.stop_reason or 'no seal'}); "
                    "run `vaultsync verify` to restore it from a target"
                )
            for off, rec in scan.records:
                if rec.type is seg.RecordType.SEAL or rec.lsn <= after_lsn:
                    continue
                if rec.type is seg.RecordType.TXN:
                    if expect is not None and rec.lsn != expect:
                        raise CorruptRecordError(
                            f"{path}: transaction LSN {rec.lsn} follows {expect - 1}; "
                            "the journal has a gap"
                        )
                    expect = rec.lsn + 1
                yield Location(segno, off, rec.size), rec


def replace_segment_file(path: Path, data: bytes) -> None:
    """Put a verified copy of a sealed segment in place of a lost or damaged local file."""
    tmp = path.with_suffix(".heal")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
