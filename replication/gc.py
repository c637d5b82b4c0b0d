"""Garbage collection at the writer: thin old points, delete and compact what none needs.

Runs in the writer (the mount daemon's loop, or `vaultsync gc` on an unmounted
volume) because only the writer can stop new writes from deduplicating
against a chunk that is about to go. One run:

1. lists every target's checkpoints and snapshots and decides, with the
   retention policy, which points stay recoverable (vaultsync/retention.py);
2. collects the live chunks: those the retained checkpoints' trees refer to,
   those any transaction of a retained replay range refers to, and those the
   current tree refers to (plus, through `Volume.gc_watch`, those any write
   made during the run refers to), and the base of every live patch chunk;
3. writes `retained.json` to every target (readers refuse other points), then
   forgets the garbage chunks in the catalog, stores the live chunks of
   mostly-garbage segments again at the head (compaction), and deletes
   segments with no live chunk left, everywhere, leaving
   `relocations/<segno>.json` so that older points still find moved chunks;
4. deletes the checkpoints no retained point needs, and the relocation
   records no retained point needs (`_drop_relocations`).

Nothing is deleted from a target before every target answered: a run with a
target down decides nothing (docs/format.md §2.6).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vaultsync.config import Config
from vaultsync.engine.catalog_image import image_chunk_ids
from vaultsync.engine.lowprio import in_background
from vaultsync.engine.replicated import ReplicatedVolume
from vaultsync.engine.volume import PreparedChunk, Volume
from vaultsync.errors import VaultsyncError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import (
    CHECKPOINTS,
    RELOCATIONS,
    RETAINED_KEY,
    SNAPSHOTS,
    checkpoint_key,
    parse_checkpoint_key,
    parse_relocation_key,
    relocation_key,
    segment_key,
)
from vaultsync.format.state_layout import StateDir
from vaultsync.format.txn import SetBlocks
from vaultsync.points.gcplan import SegmentRow, plan_segments, replay_segments
from vaultsync.points.retention import Point, Retained, plan_retention
from vaultsync.store.objectstore import ObjectMissingError, ObjectStore, StoreError

log = logging.getLogger("vaultsync.gc")

_ID = 32
_MOVE_BATCH = 4 << 20  # bytes of chunks stored again per compaction transaction


class GcError(VaultsyncError):
    pass


@dataclass
class GcReport:
    dry_run: bool = False
    retained_points: int = 0
    retained_ranges: list[dict[str, Any]] = field(default_factory=list)
    live_chunks: int = 0
    chunks_dropped: int = 0
    chunks_moved: int = 0
    segments_compacted: list[int] = field(default_factory=list)
    segments_deleted: list[int] = field(default_factory=list)
    bytes_deleted: int = 0
    checkpoints_dropped: int = 0
    relocations_dropped: int = 0
    waiting: list[int] = field(default_factory=list)  # compacted, deleted once shipped
    seconds: float = 0.0
    finished_ns: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ids(blob: bytes) -> set[bytes]:
    return {blob[i : i + _ID] for i in range(0, len(blob), _ID)}


class GarbageCollector:
    def __init__(
        self,
        vol: ReplicatedVolume,
        cfg: Config,
        stores: Sequence[ObjectStore],
        shipped: Callable[[], dict[str, int]],
        wait_shipped: Callable[[int, float], Awaitable[bool]] | None = None,
    ) -> None:
        """`shipped()` gives each target's sealed watermark (segment number);
        `wait_shipped(segno, timeout)` waits until every target holds `segno`."""
        self.vol = vol
        self.cfg = cfg
        self.stores = list(stores)
        self.shipped = shipped
        self.wait_shipped = wait_shipped
        self.cache = StateDir(vol.state_dir).gc_cache
        self.lock = asyncio.Lock()
        self._reloc_lsn: dict[str, int | None] = {}  # records never change: read once

    # -- reading what is there ------------------------------------------------------
    async def _listing(self) -> tuple[dict[str, set[Point]], list[Point]]:
        ckpts: dict[str, set[Point]] = {}
        snaps: dict[str, int] = {}
        for st in self.stores:
            try:
                found = {parse_checkpoint_key(o.key) async for o in st.list(CHECKPOINTS)}
                ckpts[st.name] = {Point(*c) for c in found if c is not None}
                for o in [o async for o in st.list(SNAPSHOTS)]:
                    doc = json.loads(await st.get(o.key))
                    snaps[str(doc["name"])] = int(doc["lsn"])
            except StoreError as e:
                raise GcError(
                    f"target {st.name!r} did not answer ({e.reason}); GC deletes nothing "
                    "unless every target answers. It will run again when the target is back"
                ) from None
            except (ValueError, KeyError, TypeError) as e:
                raise GcError(f"target {st.name!r}: a snapshot object is malformed ({e})") from None
        return ckpts, [Point(lsn, 0) for lsn in snaps.values()]

    async def _image_ids(self, p: Point) -> set[bytes]:
        """Chunk ids the tree of checkpoint `p` refers to (cached: checkpoints never change)."""
        cached = self.cache / f"ckpt-{p.lsn:016x}-{p.time_ns:016x}.ids"
        if cached.exists():
            return _ids(cached.read_bytes())
        key = checkpoint_key(p.lsn, p.time_ns)
        body = None
        for st in self.stores:
            try:
                body = await st.get(key)
                break
            except StoreError:
                continue
        if body is None:
            raise GcError(f"checkpoint {key} could not be read from any target")
        rec = seg.decode_record(body, key)
        image = await in_background(self.vol.decode_checkpoint, rec)
        found = await in_background(image_chunk_ids, image)
        self.cache.mkdir(exist_ok=True)
        tmpf = cached.with_suffix(".tmp")
        tmpf.write_bytes(b"".join(found))
        tmpf.replace(cached)
        return found

    def _segment_refs(self, segno: int, sealed: bool) -> set[bytes]:
        """Chunk ids the transactions of a local segment refer to (cached once sealed)."""
        cached = self.cache / f"seg-{segno:016x}.ids"
        if sealed and cached.exists():
            return _ids(cached.read_bytes())
        path = self.vol.segment_path(segno)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise GcError(
                f"{path} is missing but a retained point needs it; run `vaultsync verify` "
                "to restore it from a target"
            ) from None
        out: set[bytes] = set()
        for _off, rec in seg.scan_segment(data, str(path)).records:
            if rec.type is seg.RecordType.CHUNK:
                out.add(rec.payload[:_ID])
                base = seg.patch_base(rec)
                if base is not None:
                    out.add(base)
            elif rec.type is seg.RecordType.TXN:
                for op in self.vol.decode_txn(rec).ops:
                    if isinstance(op, SetBlocks):
                        out.update(bytes.fromhex(b[1]) for b in op.blocks if b[1])
        if sealed:
            self.cache.mkdir(exist_ok=True)
            tmpf = cached.with_suffix(".tmp")
            tmpf.write_bytes(b"".join(sorted(out)))
            tmpf.replace(cached)
        return out

    # -- one run ----------------------------------------------------------------------
    async def run(self, dry_run: bool = False) -> GcReport:
        async with self.lock:
            t0 = time.monotonic()
            report = GcReport(dry_run=dry_run)
            try:
                await self._run(report, dry_run)
            finally:
                self.vol.gc_watch = None
            report.seconds = round(time.monotonic() - t0, 3)
            report.finished_ns = time.time_ns()
            return report

    async def _run(self, report: GcReport, dry_run: bool) -> None:
        vol = self.vol
        if vol.fenced:
            raise GcError("this writer is fenced (promoted elsewhere); GC runs at the writer")
        vol.gc_watch = set()  # from here on, every chunk a write refers to is live
        await vol.sync(replicate=False)
        now = time.time_ns()
        per_target, snaps = await self._listing()
        common = set.intersection(*per_target.values()) if per_target else set()
        retained = plan_retention(common, snaps, now, self.cfg.retention)
        report.retained_points = len(retained.points)
        report.retained_ranges = [
            {"from_lsn": r.base.lsn, "to_lsn": r.upto} for r in retained.ranges
        ]

        rows = [SegmentRow(s.segno, s.first_lsn, s.last_lsn, s.size) for s in vol.sealed_segments()]
        marks = self.shipped()
        shipped_upto = min(marks.values()) if marks else max((r.segno for r in rows), default=0)
        newest_sealed = max((r.segno for r in rows), default=0)

        live: set[bytes] = set()
        for p in retained.points:
            live |= await self._image_ids(p)
        whole = replay_segments(rows, retained.ranges)
        replayed = sorted(whole) + [n for n in vol.local_segments() if n > newest_sealed]
        for n in replayed:
            live |= await in_background(self._segment_refs, n, n <= newest_sealed)
        live |= vol.tree_chunks()
        # A live patch needs its base (format §6.3); bases are whole chunks, so one step.
        live |= {base for pid, base in vol.patch_bases() if pid in live}
        report.live_chunks = len(live)

        candidates = [r for r in rows if r.segno not in whole and r.segno <= shipped_upto]
        live_bytes: dict[int, int] = {}
        garbage: dict[int, list[bytes]] = {}
        for r in candidates:
            held = vol.chunks_in(r.segno)
            live_bytes[r.segno] = sum(n for cid, _o, n in held if cid in live)
            garbage[r.segno] = [cid for cid, _o, _n in held if cid not in live]
        plan = plan_segments(
            candidates, retained.ranges, shipped_upto, live_bytes, self.cfg.retention.compact_below
        )
        if dry_run:
            report.segments_deleted = plan.delete
            report.segments_compacted = plan.compact
            report.chunks_dropped = sum(len(garbage[n]) for n in plan.delete + plan.compact)
            report.bytes_deleted = sum(r.size for r in candidates if r.segno in plan.delete)
            report.checkpoints_dropped = len(self._dropped(per_target, retained))
            report.relocations_dropped = len(await self._old_relocations(retained))
            return

        # Readers learn what is retained before anything they could ask for goes.
        body = json.dumps(retained.to_json(now)).encode()
        for st in self.stores:
            await st.put(RETAINED_KEY, body)

        # One synchronous step: no write can slip between the check and the drop.
        watched = vol.gc_watch or set()
        for n in plan.delete + plan.compact:
            drop = [c for c in garbage[n] if c not in watched]
            report.chunks_dropped += vol.drop_garbage(n, drop)
        vol.gc_watch = None
        vol.commit_catalog()

        if plan.compact:
            report.chunks_moved = await self._compact(plan.compact)
            report.segments_compacted = plan.compact
            await vol.sync(replicate=False)
            moved_to = vol.journal_pos[0]
            await vol.maybe_seal(force=True)
            if self.wait_shipped is not None:
                await self.wait_shipped(moved_to, 120.0)

        marks = self.shipped()
        shipped_upto = min(marks.values()) if marks else max(vol.journal_pos[0] - 1, 0)
        sizes = {r.segno: r.size for r in rows}
        for n in sorted(plan.delete + plan.compact):
            if await self._delete_segment(n, shipped_upto):
                report.segments_deleted.append(n)
                report.bytes_deleted += sizes[n]
            else:
                report.waiting.append(n)
        vol.commit_catalog()
        report.checkpoints_dropped = await self._drop_checkpoints(per_target, retained)
        report.relocations_dropped = await self._drop_relocations(retained)

    async def _compact(self, segnos: list[int]) -> int:
        """Store the live chunks of `segnos` again at the head; their records move as they are."""
        vol = self.vol
        moved = 0
        for n in segnos:
            held = vol.chunks_in(n)
            path = vol.segment_path(n)
            try:
                data = await in_background(path.read_bytes)
            except FileNotFoundError:
                log.warning("segment %d is missing locally; it is not compacted", n)
                continue
            batch: list[PreparedChunk] = []
            size = 0
            for cid, off, length in held:
                rec = seg.decode_record(data[off : off + length], f"{path}@{off}")
                batch.append(PreparedChunk(cid, len(rec.payload), rec))
                size += length
                if size >= _MOVE_BATCH:
                    vol.commit_nowait([], batch, relocate=True)
                    moved += len(batch)
                    batch, size = [], 0
            if batch:
                vol.commit_nowait([], batch, relocate=True)
                moved += len(batch)
        return moved

    async def _delete_segment(self, segno: int, shipped_upto: int) -> bool:
        """Delete a segment that holds nothing live, leaving where its moved chunks went."""
        vol = self.vol
        if vol.chunks_in(segno):
            return False  # something still lives there (a compaction that did not happen)
        path = vol.segment_path(segno)
        try:
            data = await in_background(path.read_bytes)
        except FileNotFoundError:
            data = b""
            for st in self.stores:
                try:
                    data = await st.get(segment_key(segno))
                    break
                except StoreError:
                    continue
        moved: dict[str, list[int]] = {}
        if data:
            for _off, rec in seg.scan_segment(data, f"segment {segno}").records:
                if rec.type is not seg.RecordType.CHUNK:
                    continue
                loc = vol.chunk_location(rec.payload[:_ID])
                if loc is None or loc.segno == segno:
                    continue
                if loc.segno > shipped_upto:
                    return False  # its new home is not at every target yet
                moved[rec.payload[:_ID].hex()] = [loc.segno, loc.offset, loc.length]
        for st in self.stores:
            if moved:
                # `lsn`: from this LSN on no point places a chunk in `segno` (its catalog
                # holds none there now, and the segment never changes): points that new
                # do not need this record, which is what lets GC delete it later.
                doc = {"segno": segno, "lsn": vol.last_lsn, "chunks": moved}
                await st.put(relocation_key(segno), json.dumps(doc).encode())
            await st.delete(segment_key(segno))
        path.unlink(missing_ok=True)
        (self.cache / f"seg-{segno:016x}.ids").unlink(missing_ok=True)
        vol.forget_segment(segno)
        return True

    def _dropped(
        self, per_target: dict[str, set[Point]], retained: Retained
    ) -> dict[str, list[Point]]:
        keep = {p.lsn for p in retained.points}
        floor = retained.ranges[0].base.lsn
        return {
            name: sorted(p for p in held if p.lsn < floor and p.lsn not in keep)
            for name, held in per_target.items()
        }

    async def _old_relocations(self, retained: Retained) -> dict[str, list[str]]:
        """Per target, the relocation records no retained point needs.

        A record of segment S with `lsn` L is read only by a point older than L
        (only such a point's catalog can place a chunk in S; a chain of moves
        S -> T -> U has records with increasing `lsn`, so a point that needs
        T's record but not S's finds T's still there). So once the oldest retained
        point is at or after L, and `retained.json` says so (readers refuse
        anything older), nothing reads it again. Listed at every target first:
        a target that does not answer makes the run delete nothing.
        """
        oldest = retained.oldest_lsn()
        listed: dict[str, list[str]] = {}
        for st in self.stores:
            try:
                listed[st.name] = [o.key async for o in st.list(RELOCATIONS)]
            except StoreError as e:
                raise GcError(f"target {st.name!r} did not answer ({e.reason})") from None
        old: dict[str, list[str]] = {}
        for st in self.stores:
            for key in listed[st.name]:
                if parse_relocation_key(key) is None:
                    continue
                lsn = self._reloc_lsn.get(key)
                if lsn is None:
                    lsn = self._reloc_lsn[key] = await _relocation_lsn(st, key)
                if lsn is not None and lsn <= oldest:
                    old.setdefault(st.name, []).append(key)
        return old

    async def _drop_relocations(self, retained: Retained) -> int:
        old = await self._old_relocations(retained)
        count = 0
        for st in self.stores:
            keys = old.get(st.name, [])
            if keys:
                await st.delete_many(keys)
                count += len(keys)
        return count

    async def _drop_checkpoints(self, per_target: dict[str, set[Point]], retained: Retained) -> int:
        dropped = self._dropped(per_target, retained)
        count = 0
        for st in self.stores:
            keys = [checkpoint_key(p.lsn, p.time_ns) for p in dropped.get(st.name, [])]
            if keys:
                await st.delete_many(keys)
                count += len(keys)
        for p in {p for ps in dropped.values() for p in ps}:
            (self.cache / f"ckpt-{p.lsn:016x}-{p.time_ns:016x}.ids").unlink(missing_ok=True)
        return count


async def _relocation_lsn(st: ObjectStore, key: str) -> int | None:
    """The `lsn` of a relocation record; None if it has none (written before records
    carried it: kept, since nothing says which points still need it)."""
    try:
        doc = json.loads(await st.get(key))
        return int(doc["lsn"]) if doc.get("lsn") is not None else None
    except ObjectMissingError:
        return None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("target %s: %s is malformed (%s); it is kept", st.name, key, e)
        return None


async def gc_unmounted(cfg: Config, passphrase: str | None, dry_run: bool) -> GcReport:
    """One GC run on a volume that is not mounted (the caller holds its lock).

    Chunks moved by compaction reach the targets at the next mount; the
    segments they left are deleted by the run after that.
    """
    from vaultsync.store.targets import open_stores

    v = cfg.volume
    vol = await Volume.open(
        v.state_dir, passphrase, segment_size=v.segment_size, segment_max_age=v.segment_max_age
    )
    try:
        marks = {name: wm[0] for name, wm in vol.watermarks().items()}
        async with open_stores(cfg, max_attempts=3) as stores:
            collector = GarbageCollector(
                vol, cfg, stores, lambda: {t.name: marks.get(t.name, 0) for t in cfg.targets}
            )
            return await collector.run(dry_run)
    finally:
        await vol.close()


def gc_mounted(state_dir: Path, pid: int, timeout: float) -> dict[str, Any]:
    """Ask the mount daemon `pid` to run GC now (SIGUSR1) and wait for its report."""
    import os
    import signal

    started = time.time_ns()
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            doc = json.loads(StateDir(state_dir).replication_status.read_text())
        except (OSError, ValueError):
            continue
        last = doc.get("gc") or {}
        if int(last.get("finished_ns") or 0) > started:
            return dict(last)
    raise GcError(
        f"the mount daemon (pid {pid}) did not finish GC within {timeout:.0f} s; "
        "it goes on in the background: see `vaultsync status` and the daemon's log"
    )
