"""`vaultsync promote`: make this site the writer, from what one target holds.

Order (each step is what makes the next safe):

1. Take the lease of epoch E+1 at every reachable target (conditional
   create). From now on the old writer is fenced as soon as it looks (its
   monitor lists `lease/` at least every LEASE_WINDOW/3), and it can never
   seal a segment we sealed.
2. Wait until 2 x LEASE_WINDOW have passed since the lease was taken, unless
   the source holds no tail piece past its newest whole segment (docs/format.md
   §2.4). The old writer counts a tail piece for fsync while its last lease
   check is less than LEASE_WINDOW old, and that check began before our lease
   existed: after the wait, every piece it counted is at the source, so the
   rebuild below sees every write it acknowledged. (The factor 2 is margin for
   the two machines' clocks running at different rates.) Without such a piece
   there is nothing to wait for: the old writer counts whole segments, and the
   first piece of each segment, only after a check begun after the upload,
   so whatever it acknowledged was visible when we looked, and stays so.
3. Rebuild the newest point from the source target into the local state
   directory; the downloaded segments become the local journal.
4. If the source held tail pieces of an open segment N, seal N here from
   exactly those bytes and upload `segments/N.seg` with a conditional create
   before anything else: readers then ignore any tail the old writer adds to
   N, and the old writer's own attempt to seal N fails (it is fenced). If the
   old writer sealed N first, rebuild again and take its N.
5. Record the new epoch; the next `mount` continues at segment N+1.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vaultsync.config import Config
from vaultsync.control.lease import current_epoch, lease_clock, lease_doc, lease_window, take_lease
from vaultsync.engine.journal import Journal
from vaultsync.engine.volume import has_volume
from vaultsync.errors import VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import (
    SEGMENTS,
    TAILS,
    parse_segment_key,
    parse_tail_key,
    segment_key,
)
from vaultsync.format.state_layout import StateDir
from vaultsync.points.recovery import PointSpec, SegmentCache, rebuild, target_header
from vaultsync.store.objectstore import ObjectStore, StoreError
from vaultsync.store.targets import open_stores, read_remote_header


@dataclass
class PromoteReport:
    epoch: int
    lsn: int
    segments: int
    sealed_tail: int | None
    leased_at: list[str]
    moved_aside: Path | None
    waited: float = 0.0  # seconds spent waiting for the old writer's lease to expire


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seal_tail(buf: bytes, volume_id: bytes, segno: int, where: str) -> bytes:
    """The open segment `segno` a writer left as tail pieces (`buf`), cut after its last
    transaction and sealed: the segment a new writer continues after (§2.4)."""
    scan = seg.scan_segment(buf, where)
    end, count, last = seg.HEADER_SIZE, 0, 0
    for i, (off, rec) in enumerate(scan.records):
        if rec.type is seg.RecordType.TXN:
            end, count, last = off + rec.size, i + 1, rec.lsn
    seal = seg.Record(seg.RecordType.SEAL, last, time.time_ns(), seg.seal_payload(count, last))
    sealed = buf[:end] + seg.encode_record(seal)
    if not seg.is_complete_segment(sealed, volume_id, segno):
        raise VolumeError(f"{where}: the sealed tail does not verify; promotion stopped")
    return sealed


def _seal_tail(path: Path, volume_id: bytes, segno: int) -> None:
    path.write_bytes(seal_tail(path.read_bytes(), volume_id, segno, str(path)))


async def promote(
    cfg: Config,
    source: str,
    passphrase: str | None,
    *,
    force: bool = False,
    notify: Callable[[str], None] = _to_stderr,
) -> PromoteReport:
    state = cfg.volume.state_dir
    moved: Path | None = None
    if has_volume(state) and not force:
        raise VolumeError(
            f"{state} already holds a volume; promotion rebuilds it from the target. "
            "Use --force to move the current one aside (kept for salvage)"
        )
    async with open_stores(cfg, max_attempts=3) as stores:
        by_name = {s.name: s for s in stores}
        src = by_name[cfg.target(source).name]
        await _check_same_volume(cfg, src, stores)
        await _check_rebuildable(cfg, src, passphrase)
        if has_volume(state):
            moved = state.with_name(f"{state.name}.salvage-{time.strftime('%Y%m%d-%H%M%S')}")
            state.rename(moved)
        epochs = []
        for st in stores:
            with contextlib.suppress(StoreError):
                epochs.append(await current_epoch(st))
        epoch = max(epochs, default=0) + 1
        leased = []
        for st in stores:
            try:
                if not await take_lease(st, lease_doc(epoch, 0, source)):
                    raise VolumeError(
                        f"another site took the writer lease of epoch {epoch} at target "
                        f"{st.name!r} first; do not promote twice"
                    )
                leased.append(st.name)
            except StoreError as e:
                if st is src:
                    raise
                # Unreachable now: its next contact with the old writer's history is ours.
                e.add_note("lease not taken")
        leased_done = lease_clock()
        waited = await wait_out_old_lease(src, leased_done, notify)
        for _attempt in range(3):
            result = await _rebuild_here(cfg, src, passphrase, epoch)
            if result is not None:
                lsn, segments, sealed = result
                return PromoteReport(epoch, lsn, segments, sealed, leased, moved, waited)
        raise VolumeError(
            "the old writer kept sealing segments during promotion; stop it and promote again"
        )


async def _open_tail(src: ObjectStore) -> int | None:
    """The segment after the newest whole one at `src`, if `src` holds a tail piece of
    it (or of a later one); None if it holds none. Listed after the lease was taken:
    segments first, then tails (docs/format.md §2.4 says why this order)."""
    top = 0
    async for o in src.list(SEGMENTS):
        top = max(top, parse_segment_key(o.key) or 0)
    async for o in src.list(TAILS):
        parsed = parse_tail_key(o.key)
        if parsed is not None and parsed[0] > top:
            return parsed[0]
    return None


async def wait_out_old_lease(
    src: ObjectStore, leased_done: float, notify: Callable[[str], None]
) -> float:
    """Step 2 of the module docstring: wait until 2 x LEASE_WINDOW have passed since
    `leased_done` (lease_clock) unless the source holds no tail piece past its newest
    whole segment. Returns the seconds waited.

    INVARIANT (docs/format.md §2.4): nothing of the source is read for the rebuild
    before this returns. The old writer counted a tail piece only if a lease check
    that found no newer epoch began at most LEASE_WINDOW before it counted it; such
    a check began before our lease existed (`leased_done`), so every piece it
    counted had landed by leased_done + LEASE_WINDOW on its clock, which is before
    leased_done + 2 x LEASE_WINDOW on ours unless the clocks' rates differ by a
    factor of two. Skipping is safe without a piece past the newest whole segment:
    the old writer counts whole segments, and the first tail piece of each segment,
    only after a check begun after their upload (so they landed before our lease),
    and it deletes tail pieces only after the whole segment is vouched for; a
    counted piece of a segment after the newest whole one would therefore have
    left its first piece in the listing.
    """
    window = lease_window()
    segno = await _open_tail(src)
    if segno is None:
        return 0.0
    remaining = 2 * window - (lease_clock() - leased_done)
    if remaining <= 0:
        return 0.0
    notify(
        f"waiting {remaining:.0f} s for the old writer's lease to expire (2 x the "
        f"{window:g} s lease window: target {src.name!r} holds tail pieces of the open "
        f"segment {segno}, which the old writer may still be adding to)"
    )
    started = lease_clock()
    while (left := 2 * window - (lease_clock() - leased_done)) > 0:
        await asyncio.sleep(min(left, 1.0))
    return lease_clock() - started


async def _check_rebuildable(cfg: Config, src: ObjectStore, passphrase: str | None) -> None:
    """Everything that would make the rebuild fail after the lease is taken, checked before
    it: a lease taken by a promotion that then fails leaves the volume with no writer."""
    header = await target_header(src, cfg.volume.name)
    header.unlock(passphrase)  # a wrong passphrase: refused here, before any lease
    first = None
    async for o in src.list(SEGMENTS):
        first = parse_segment_key(o.key)
        if first is not None:
            break
    if first is not None and first > 1:
        raise VolumeError(
            f"target {src.name!r} no longer holds segments before {first} (garbage "
            "collection removed them), and promotion rebuilds the whole journal; nothing was "
            "changed. Restore a point from it instead (vaultsync restore, mount --from)"
        )


async def _check_same_volume(cfg: Config, src: ObjectStore, stores: list[ObjectStore]) -> None:
    """No lease is taken anywhere unless every reachable target holds the named volume."""
    header = await target_header(src, cfg.volume.name)
    for st in stores:
        if st is src:
            continue
        with contextlib.suppress(StoreError):  # an unreachable target is fenced later
            other = await read_remote_header(st)
            if other is not None and other.volume_id != header.volume_id:
                raise VolumeError(
                    f"target {st.name!r} holds another volume ({other.name!r}, "
                    f"{other.volume_id_hex}) than {src.name!r} ({header.volume_id_hex}); "
                    "fix its bucket or prefix before promoting"
                )


async def _rebuild_here(
    cfg: Config, src: ObjectStore, passphrase: str | None, epoch: int
) -> tuple[int, int, int | None] | None:
    state = cfg.volume.state_dir
    if state.exists():
        shutil.rmtree(state)
    journal_dir = StateDir(state).journal
    cache = SegmentCache(journal_dir, limit=1 << 62)
    # Every segment is needed locally (targets that lag are shipped from here): no checkpoint.
    rebuilt, _keys = await rebuild(
        src,
        state,
        passphrase,
        PointSpec(),
        cache,
        use_checkpoint=False,
        volume_name=cfg.volume.name,
    )
    cat = rebuilt.catalog
    try:
        sealed_tail = None
        if rebuilt.tail is not None:
            segno = rebuilt.tail[0]
            path = journal_dir / f"{segno:016x}.seg"
            await asyncio.to_thread(_seal_tail, path, rebuilt.header.volume_id, segno)
            data = path.read_bytes()
            if not await src.put_new(segment_key(segno), data):
                return None  # the old writer sealed it first: take its version
            sealed_tail = segno
        j = Journal(journal_dir, rebuilt.header.volume_id, epoch)
        now = time.time_ns()
        for segno in j.segment_numbers():
            first, last, size = await asyncio.to_thread(j.sealed_info, segno)
            cat.note_segment(segno, size, first, last, now)
        top = max(j.segment_numbers(), default=0)
        if top:
            cat.set_watermark(src.name, top, rebuilt.lsn, now)
        cat.set_meta("volume_id", rebuilt.header.volume_id_hex)
        cat.set_meta("epoch", epoch)
        cat.commit()
    finally:
        cat.close()
    # volume.json last: its presence means "a complete volume lives here".
    StateDir(state).header.write_bytes(rebuilt.header.to_bytes())
    assert StateDir(state).catalog.exists()
    return rebuilt.lsn, len(rebuilt.segments), sealed_tail
