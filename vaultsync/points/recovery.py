"""Rebuilding the volume as of a point in time from one target alone.

A target holds sealed segments `1..N` and, for a sync target, tail pieces of
segment N+1 (docs/format.md §2). Replaying their transactions in LSN order up
to the chosen point gives the catalog as it was then; chunk locations point
into the target's segments, and the bytes are cached locally as they are
downloaded (bounded), so later reads of those files cost nothing.

Points: every committed transaction is one. A point is chosen by LSN, by
wall-clock time (the newest transaction at or before it), or by a snapshot
name (snapshots/<name>.json holds an LSN).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from vaultsync.engine.catalog import READABLE_SCHEMAS, Catalog, StoredChunk
from vaultsync.engine.catalog_image import image_schema
from vaultsync.engine.journal import Location
from vaultsync.errors import FormatError, VaultsyncError, VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import (
    CHECKPOINTS,
    SNAPSHOTS,
    checkpoint_key,
    contiguous_end,
    parse_checkpoint_key,
    parse_segment_key,
    parse_snapshot_key,
    parse_tail_key,
    segment_key,
    tail_prefix,
)
from vaultsync.format.chunks import Codec
from vaultsync.format.crypto import VolumeKeys
from vaultsync.format.header import VolumeHeader
from vaultsync.format.state_layout import StateDir
from vaultsync.format.txn import Transaction
from vaultsync.points.gc_documents import read_retained
from vaultsync.points.retention import Retained
from vaultsync.points.snapshots import named_key
from vaultsync.store.objectstore import ObjectStore
from vaultsync.store.targets import read_remote_header


class PointError(VaultsyncError):
    pass


@dataclass(frozen=True)
class PointSpec:
    """What `--at` asked for: an LSN, a time (ns since the epoch), a snapshot, or the newest."""

    lsn: int | None = None
    time_ns: int | None = None
    snapshot: str | None = None

    def describe(self) -> str:
        if self.lsn is not None:
            return f"LSN {self.lsn}"
        if self.time_ns is not None:
            return datetime.fromtimestamp(self.time_ns / 1e9, UTC).isoformat()
        if self.snapshot is not None:
            return f"snapshot {self.snapshot!r}"
        return "the newest point"


def parse_point(text: str | None) -> PointSpec:
    """`--at` value: empty/"latest", an integer LSN, an ISO-8601 time, or a snapshot name.

    Whatever a person or a request can type either becomes a point or is a
    PointError with one line saying what to give instead: an LSN too long for
    `int()` or for the catalog, or a time outside the years a point can be
    shown in, used to escape as a ValueError or OverflowError (a traceback in
    the CLI, a 500 in the API).
    """
    max_lsn = 2**63 - 1  # the catalog keeps LSNs as SQLite integers
    if text is None or text in ("", "latest", "now"):
        return PointSpec()
    digits = text[4:] if text.startswith("lsn:") else text
    if text.startswith("lsn:") or re.fullmatch(r"[0-9]+", text):
        shown = digits if len(digits) <= 40 else digits[:20] + f"... ({len(digits)} characters)"
        if not re.fullmatch(r"[0-9]+", digits):
            raise PointError(
                f"{text[:60]!r} is not an LSN: give digits only, e.g. 1234 or lsn:1234"
            )
        significant = digits.lstrip("0")
        if len(significant) > len(str(max_lsn)) or int(significant or "0") > max_lsn:
            raise PointError(
                f"LSN {shown} is out of range: an LSN is a whole number from 1 to {max_lsn}"
            )
        return PointSpec(lsn=int(significant or "0"))
    if text.startswith("snapshot:"):
        return PointSpec(snapshot=text[9:])
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return PointSpec(snapshot=text)
    # Points are shown as UTC dates, so the instant must be one: years 1 to 9999 in UTC,
    # with a day to spare at the top for the float a point's time is shown through.
    try:
        if dt.tzinfo is None:
            dt = dt.astimezone()  # a local time, as the user at the terminal means it
        utc = dt.astimezone(UTC)
        in_range = utc < datetime(9999, 12, 31, tzinfo=UTC)
    except (OverflowError, ValueError, OSError):
        in_range = False
    if not in_range:
        raise PointError(
            f"the time {text!r} is out of range: give a time after 0001-01-01 and before "
            "9999-12-31 in UTC, e.g. 2026-11-25T06:00:00Z"
        )
    delta = utc - datetime(1970, 1, 1, tzinfo=UTC)  # exact: no float between here and the ns
    return PointSpec(
        time_ns=(delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    )


@dataclass
class Rebuilt:
    header: VolumeHeader
    catalog: Catalog
    lsn: int
    time_ns: int
    segments: list[int] = field(default_factory=list)
    tail: tuple[int, int] | None = None  # (segno, bytes) of tail pieces used
    checkpoint: int | None = None  # LSN of the checkpoint started from


async def snapshot_lsn(store: ObjectStore, name: str) -> int:
    key = named_key(name)
    if await store.head(key) is None:
        known = [n async for o in store.list(SNAPSHOTS) if (n := parse_snapshot_key(o.key))]
        raise PointError(
            f"no snapshot named {name!r} at target {store.name!r} "
            f"(snapshots: {', '.join(known) or 'none'})"
        )
    try:
        return int(json.loads(await store.get(key))["lsn"])
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"target {store.name!r}: {key} is malformed ({e})") from None


def _not_retained(store: ObjectStore, what: str, kept: Retained) -> PointError:
    return PointError(
        f"{what} is no longer retained at target {store.name!r} (garbage collection thinned "
        f"it); the oldest point it holds is LSN {kept.oldest_lsn()}. "
        "See `vaultsync points` for what can be recovered"
    )


async def _pick_checkpoint(
    store: ObjectStore, stop_lsn: int | None, stop_ns: int | None
) -> tuple[int, int] | None:
    """The newest checkpoint (LSN, time) at or before the point, from the listing alone."""
    found = [parse_checkpoint_key(o.key) async for o in store.list(CHECKPOINTS)]
    fit = [
        c
        for c in found
        if c is not None
        and (stop_lsn is None or c[0] <= stop_lsn)
        and (stop_ns is None or c[1] <= stop_ns)
    ]
    return max(fit, default=None)


REBUILD_AHEAD = 4  # segment downloads in flight while a rebuild replays


class SegmentCache:
    """Downloaded segment bytes on local disk, bounded; the oldest are dropped first."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.dir = directory
        self.limit = limit
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, segno: int) -> Path:
        return self.dir / f"{segno:016x}.seg"

    def put(self, segno: int, data: bytes) -> None:
        tmp = self.path(segno).with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(self.path(segno))
        files = sorted(self.dir.glob("*.seg"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.limit:
            victim = files.pop(0)
            total -= victim.stat().st_size
            victim.unlink(missing_ok=True)

    def has(self, segno: int) -> bool:
        return self.path(segno).exists()

    def read(self, loc: Location) -> bytes | None:
        try:
            with self.path(loc.segno).open("rb") as f:
                f.seek(loc.offset)
                data = f.read(loc.length)
        except OSError:
            return None
        return data if len(data) == loc.length else None


async def target_header(store: ObjectStore, volume_name: str | None = None) -> VolumeHeader:
    """The volume header at a target; refused when there is none, or (with `volume_name`,
    the volume the config names) when it is another volume's: a wrong bucket or prefix."""
    header = await read_remote_header(store)
    if header is None:
        raise VolumeError(
            f"target {store.name!r} holds no vaultsync volume ({store.where}); "
            "check the bucket and prefix"
        )
    if volume_name is not None and header.name != volume_name:
        raise VolumeError(
            f"target {store.name!r} holds volume {header.name!r} ({header.volume_id_hex}), "
            f"not {volume_name!r} as the config's volume.name says ({store.where}); "
            "check the target's bucket and prefix, or correct volume.name"
        )
    return header


def segment_transactions(
    data: bytes, segno: int, header: VolumeHeader, where: str, complete: bool
) -> Iterator[tuple[seg.Record, list[StoredChunk]]]:
    """The TXN records of a segment's bytes, in order, each with the chunk records that
    precede it (which it may refer to), after checking the segment is this volume's
    segment `segno` and, when `complete`, that it is whole and sealed. A tail piece's
    bytes (not `complete`) end at the last transaction they hold whole."""
    scan = seg.scan_segment(data, where)
    if scan.header.volume_id != header.volume_id or scan.header.segment_no != segno:
        raise FormatError(f"{where}: belongs to another volume or position")
    if complete and (not scan.sealed or scan.stop_reason):
        raise FormatError(
            f"{where}: damaged ({scan.stop_reason or 'not sealed'}); "
            "recover from another target or run `vaultsync verify` at the writer"
        )
    pending: list[StoredChunk] = []
    for off, rec in scan.records:
        if rec.type is seg.RecordType.CHUNK:
            pending.append(StoredChunk.of(rec, Location(segno, off, rec.size)))
        elif rec.type is seg.RecordType.TXN:
            yield rec, pending
            pending = []


async def rebuild(
    store: ObjectStore,
    state_dir: Path,
    passphrase: str | None,
    point: PointSpec,
    cache: SegmentCache,
    progress: Callable[[int, int], None] | None = None,
    *,
    use_checkpoint: bool = True,
    durable: bool = True,
    volume_name: str | None = None,
    tails: bool = True,
) -> tuple[Rebuilt, VolumeKeys | None]:
    """A fresh catalog in `state_dir` holding the volume as of `point`, from `store` alone.

    `volume_name` is the volume the caller's config names: a target holding
    another one (the wrong bucket or prefix) is refused before anything is read.

    Starts from the newest checkpoint at or before the point (if any, and if
    `use_checkpoint`), then replays only the segments after it. The catalog is
    built without fsync and made durable once at the end, or not at all when
    not `durable` (a throwaway catalog: a point mount, a restore, an API view).
    Without `tails`, the open segment's tail pieces are left out: the point is the
    end of the last whole segment (a standby's copy holds whole segments only).
    """
    header = await target_header(store, volume_name)
    keys = header.unlock(passphrase)
    codec = Codec(header.compression_level, keys)
    stop_lsn, stop_ns = point.lsn, point.time_ns
    if point.snapshot is not None:
        stop_lsn = await snapshot_lsn(store, point.snapshot)
    kept = await read_retained(store)
    if kept is not None:
        if stop_lsn is not None and not kept.covers(stop_lsn):
            raise _not_retained(store, point.describe(), kept)
        window = kept.ranges[0].base if kept.ranges else None
        if stop_ns is not None and (window is None or stop_ns < window.time_ns):
            # Older than the keep-everything window: the newest retained point before it.
            older = kept.newest_at_or_before(stop_ns)
            if older is None:
                raise _not_retained(store, point.describe(), kept)
            stop_lsn, stop_ns = older.lsn, None
    found = [parse_segment_key(o.key) async for o in store.list("segments/")]
    segnos = sorted(n for n in found if n is not None)
    state_dir.mkdir(parents=True, exist_ok=True)
    cat_path = StateDir(state_dir).catalog
    for suffix in ("", "-wal", "-shm"):
        Path(str(cat_path) + suffix).unlink(missing_ok=True)
    ckpt = await _pick_checkpoint(store, stop_lsn, stop_ns) if use_checkpoint else None
    if ckpt is not None:
        key = checkpoint_key(*ckpt)
        rec = seg.decode_record(await store.get(key), f"target {store.name!r} {key}")
        if rec.lsn != ckpt[0]:
            raise FormatError(f"target {store.name!r}: {key} holds LSN {rec.lsn}")
        image = await asyncio.to_thread(codec.decode_checkpoint, rec)
        await asyncio.to_thread(cat_path.write_bytes, image)
        if image_schema(cat_path) not in READABLE_SCHEMAS:  # unknown layout: replay instead
            cat_path.unlink()
            ckpt = None
    # A catalog rebuilt from scratch: no journal on disk, no fsync until it is whole.
    catalog = Catalog.open(cat_path, bulk=True)
    result = Rebuilt(header, catalog, 0, 0)
    first_time: int | None = None
    if ckpt is not None:
        result.lsn, result.time_ns = ckpt
        first_time = ckpt[1]
        result.checkpoint = ckpt[0]
        covered = [
            s["segno"]
            for s in catalog.segments()
            if s["sealed"] and (s["last_lsn"] or 0) <= ckpt[0]
        ]
        start = max(covered, default=0) + 1
        segnos = [n for n in segnos if n >= start]
    else:
        start = 1

    gap = False

    def apply_segment(segno: int, data: bytes, complete: bool) -> bool:
        """Apply what the point admits; False once past it, or at a gap in history
        (segments garbage-collected because no retained point needs them)."""
        nonlocal first_time, gap
        where = f"target {store.name!r} segment {segno}"
        for rec, chunks in segment_transactions(data, segno, header, where, complete):
            if rec.lsn <= result.lsn:
                continue  # already in the checkpoint image
            if rec.lsn != result.lsn + 1:
                gap = True
                return False
            if first_time is None:
                first_time = rec.time_ns
            if stop_lsn is not None and rec.lsn > stop_lsn:
                return False
            if stop_ns is not None and rec.time_ns > stop_ns:
                return False
            catalog.apply(rec.lsn, Transaction.decode(codec.decode_txn(rec)), chunks)
            result.lsn, result.time_ns = rec.lsn, rec.time_ns
        return True

    def keep_and_apply(segno: int, data: bytes) -> bool:
        cache.put(segno, data)
        return apply_segment(segno, data, True)

    total = len(segnos)
    # Segments download REBUILD_AHEAD at a time while the oldest is applied: one GET
    # at a time leaves most of a fast store's bandwidth unused.
    fetches: dict[int, asyncio.Future[bytes]] = {}
    going = True
    try:
        for i, segno in enumerate(segnos):
            for j in range(i, min(i + REBUILD_AHEAD, total)):
                if j not in fetches:
                    fetches[j] = asyncio.ensure_future(store.get(segment_key(segnos[j])))
            data = await fetches.pop(i)
            result.segments.append(segno)
            going = await asyncio.to_thread(keep_and_apply, segno, data)
            del data
            if progress is not None:
                progress(i + 1, total)
            if not going:
                break
    finally:
        for f in fetches.values():
            f.cancel()
            f.add_done_callback(lambda f: f.cancelled() or f.exception())
    if going and not gap and tails:
        # The tail pieces of the segment after the last whole one; with a checkpoint
        # that covers every whole segment, that is the one after the checkpoint.
        nxt = (segnos[-1] + 1) if segnos else start
        pieces: dict[tuple[int, int], str] = {}
        async for o in store.list(tail_prefix(nxt)):
            parsed = parse_tail_key(o.key)
            if parsed and parsed[0] == nxt:
                pieces[(parsed[1], parsed[2])] = o.key
        end = contiguous_end(list(pieces))
        if end > seg.HEADER_SIZE:
            buf = bytearray()
            for (start, stop), key in sorted(pieces.items()):
                if start > len(buf) or stop <= len(buf):
                    continue
                part = await store.get(key)
                buf += part[len(buf) - start :]
                if len(buf) >= end:
                    break
            await asyncio.to_thread(cache.put, nxt, bytes(buf))
            await asyncio.to_thread(apply_segment, nxt, bytes(buf), False)
            result.tail = (nxt, len(buf))
    if stop_ns is not None and first_time is not None and stop_ns < first_time:
        catalog.close()
        first = datetime.fromtimestamp(first_time / 1e9, UTC).isoformat()
        raise PointError(f"{point.describe()} is before the first point of the volume ({first})")
    if kept is not None and result.lsn and not kept.covers(result.lsn):
        catalog.close()
        raise _not_retained(store, point.describe(), kept)
    if result.lsn == 0:
        catalog.close()
        if gap and kept is not None:
            raise _not_retained(store, point.describe(), kept)
        raise PointError(f"target {store.name!r} holds no transaction yet")
    if stop_lsn is not None and result.lsn < stop_lsn:
        catalog.close()
        raise PointError(
            f"target {store.name!r} holds points up to LSN {result.lsn}, not {stop_lsn}"
        )
    await asyncio.to_thread(catalog.end_bulk, cat_path, durable)
    return result, keys
