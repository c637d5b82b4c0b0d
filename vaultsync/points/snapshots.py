"""Named snapshots (snapshots/<name>.json in every target) and the points a target can recover.

A snapshot names an LSN; it is written to every target with a conditional
create, so a name can never silently change meaning. Points are read cheaply:
the first record of the first segment and the fixed-size SEAL record at the
end of each segment give every segment's LSN range and time.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from vaultsync.config import Config
from vaultsync.engine.catalog import read_only
from vaultsync.engine.volume import has_volume
from vaultsync.errors import VaultsyncError, VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import (
    SNAPSHOTS,
    is_snapshot_name,
    parse_segment_key,
    segment_key,
    snapshot_key,
    tail_prefix,
)
from vaultsync.format.state_layout import StateDir
from vaultsync.points.gc_documents import read_retained
from vaultsync.store.objectstore import ObjectStore, StoreError
from vaultsync.store.targets import open_stores


class SnapshotError(VaultsyncError):
    pass


def named_key(name: str) -> str:
    """The key of snapshot `name`; a name the format does not allow is refused with the
    rule spelled out, since it usually comes straight from the user."""
    if not is_snapshot_name(name):
        raise SnapshotError(
            f"snapshot name {name!r} is invalid: 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return snapshot_key(name)


def _local_last_lsn(cfg: Config) -> int:
    state = cfg.volume.state_dir
    if not has_volume(state):
        raise VolumeError(f"{state} holds no volume; snapshots are taken at the writer")
    with read_only(StateDir(state).catalog) as cat:
        return cat.last_lsn()


async def create_snapshot(cfg: Config, name: str, lsn: int | None = None) -> dict[str, Any]:
    key = named_key(name)
    lsn = lsn if lsn is not None else _local_last_lsn(cfg)
    doc = {"name": name, "lsn": lsn, "created_ns": time.time_ns()}
    body = json.dumps(doc).encode()
    async with open_stores(cfg) as stores:
        for st in stores:
            if await st.head(key) is not None:
                raise SnapshotError(
                    f"snapshot {name!r} already exists at target {st.name!r}; "
                    "delete it first or choose another name"
                )
        for st in stores:
            if not await st.create_if_absent(key, body):
                raise SnapshotError(f"snapshot {name!r} was created concurrently at {st.name!r}")
    return doc


async def list_snapshots(cfg: Config) -> list[dict[str, Any]]:
    """Every snapshot any reachable target knows, with the targets that hold it."""
    found: dict[str, dict[str, Any]] = {}
    async with open_stores(cfg, max_attempts=2) as stores:
        for st in stores:
            try:
                keys = [o.key async for o in st.list(SNAPSHOTS)]
                for k in keys:
                    doc = json.loads(await st.get(k))
                    entry = found.setdefault(doc["name"], {**doc, "targets": []})
                    entry["targets"].append(st.name)
            except (StoreError, ValueError, KeyError):
                continue
    return sorted(found.values(), key=lambda d: (d["lsn"], d["name"]))


async def delete_snapshot(cfg: Config, name: str) -> list[str]:
    key = named_key(name)
    deleted = []
    async with open_stores(cfg) as stores:
        for st in stores:
            if await st.head(key) is not None:
                await st.delete(key)
                deleted.append(st.name)
    if not deleted:
        raise SnapshotError(f"no snapshot named {name!r} at any target")
    return deleted


@dataclass
class SegmentPoints:
    segno: int
    last_lsn: int
    sealed_ns: int


async def target_points(store: ObjectStore) -> dict[str, Any]:
    """What one target can recover: its LSN range and times, segment by segment."""
    sizes = {
        n: o.size
        async for o in store.list("segments/")
        if (n := parse_segment_key(o.key)) is not None
    }
    segnos = sorted(sizes)
    out: dict[str, Any] = {"target": store.name, "segments": len(segnos)}
    if not segnos:
        return {**out, "first_lsn": None, "last_lsn": None}
    head = await store.get(segment_key(segnos[0]), (0, seg.HEADER_SIZE + 4096))
    first = next(seg.iter_records(head), None)

    async def seal_of(segno: int) -> SegmentPoints:
        size = sizes[segno]
        raw = await store.get(segment_key(segno), (size - seg.SEAL_RECORD_SIZE, size))
        rec = seg.decode_record(raw, f"{store.name}:{segment_key(segno)}")
        return SegmentPoints(segno, seg.parse_seal(rec.payload)[1], rec.time_ns)

    seals = await asyncio.gather(*(seal_of(n) for n in segnos))
    tails = [o.key async for o in store.list(tail_prefix(segnos[-1] + 1))]
    kept = await read_retained(store)
    first_lsn, first_ns = (first[1].lsn, first[1].time_ns) if first else (None, None)
    if kept is not None:
        # After GC: whole history from the window's base on, thinned points before it.
        doc = kept.to_json(0)
        out["retained"] = {"points": doc["points"], "ranges": doc["ranges"]}
        out["retained"]["oldest_lsn"] = kept.oldest_lsn()
        oldest = min(kept.points, default=None, key=lambda p: p.lsn)
        first_lsn = kept.oldest_lsn()
        if oldest is not None and oldest.lsn == first_lsn:
            first_ns = oldest.time_ns
    return {
        **out,
        "first_lsn": first_lsn,
        "first_time_ns": first_ns,
        "last_lsn": seals[-1].last_lsn,
        "last_time_ns": seals[-1].sealed_ns,
        "open_tail_pieces": len(tails),
        "by_segment": [s.__dict__ for s in seals],
    }
