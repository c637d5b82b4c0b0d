"""Reading chunk records back from the targets, with failover and healing.

Used when the local journal cannot serve a chunk (a segment file lost or
damaged). Targets are tried healthiest and fastest first; every record is
verified by its chunk id before it is returned. A target whose copy fails
verification gets the whole segment re-uploaded from a good source, and a bad
or missing local segment file is replaced by a verified copy, so one read
heals both sides.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from vaultsync.engine.journal import Location, replace_segment_file
from vaultsync.errors import CryptoError, FormatError, VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import segment_key
from vaultsync.store.objectstore import StoreError

if TYPE_CHECKING:
    from vaultsync.engine.replicated import ReplicatedVolume
    from vaultsync.replication.shipper import Shipper

log = logging.getLogger("vaultsync.replication")

_healing: set[asyncio.Future[None]] = set()  # keeps heal tasks alive until done
_RANK = {"healthy": 0, "degraded": 1, "down": 2}


def _ordered(shippers: list[Shipper], segno: int) -> list[Shipper]:
    have = [s for s in shippers if s.sealed_wm >= segno]
    return sorted(have, key=lambda s: (_RANK[s.health.state], s.health.median_latency()))


async def fetch_chunk(
    shippers: list[Shipper], vol: ReplicatedVolume, loc: Location, cid: bytes
) -> bytes:
    bad: list[Shipper] = []
    errors = []
    for sh in _ordered(shippers, loc.segno):
        try:
            raw = await sh.store.get(segment_key(loc.segno), (loc.offset, loc.offset + loc.length))
            rec = seg.decode_record(raw, f"{sh.name}:{segment_key(loc.segno)}@{loc.offset}")
            base_id = seg.patch_base(rec)
            # A patch needs its base: read the usual way (locally, else from a target).
            base = await vol.read_chunk(base_id) if base_id is not None else None
            data = vol.decode_chunk(rec, cid, base)
        except (FormatError, CryptoError) as e:
            log.error("target %s holds a damaged copy of segment %d: %s", sh.name, loc.segno, e)
            bad.append(sh)
            errors.append(f"{sh.name}: damaged")
            continue
        except StoreError as e:
            errors.append(f"{sh.name}: {e.reason}")
            continue
        task = asyncio.ensure_future(_heal(vol, sh, bad, loc.segno))
        _healing.add(task)
        task.add_done_callback(_healing.discard)
        return data
    raise VolumeError(
        f"chunk {cid.hex()[:16]}… of segment {loc.segno} is unreadable locally and at every "
        f"target ({'; '.join(errors) or 'no target holds that segment yet'})"
    )


async def _heal(vol: ReplicatedVolume, good: Shipper, bad: list[Shipper], segno: int) -> None:
    """Copy a verified segment to the targets that had it damaged, and to the local journal."""
    try:
        data = await good.store.get(segment_key(segno))
        if not seg.is_complete_segment(data, vol.header.volume_id, segno):
            return
        for sh in bad:
            await sh.store.put(segment_key(segno), data)
            log.warning("healed segment %d at target %s from %s", segno, sh.name, good.name)
        path = vol.segment_path(segno)
        if segno != vol.journal_pos[0]:  # the open segment is never replaced
            local_ok = await asyncio.to_thread(_local_ok, vol, path, segno)
            if not local_ok:
                await asyncio.to_thread(replace_segment_file, path, data)
                log.warning("restored local segment %d from target %s", segno, good.name)
    except (StoreError, OSError) as e:
        log.error("could not heal segment %d: %s", segno, e)


def _local_ok(vol: ReplicatedVolume, path: os.PathLike[str], segno: int) -> bool:
    try:
        with open(path, "rb") as f:
            return seg.is_complete_segment(f.read(), vol.header.volume_id, segno)
    except OSError:
        return False
