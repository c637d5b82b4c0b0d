"""What `vaultsync status` reports, gathered without disturbing a running mount.

The catalog is read through a read-only SQLite connection (WAL lets it sit
beside the writer), so status never runs recovery or takes the volume's
lock. The numbers here are the ones the REST API and metrics will expose.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from vaultsync.config import Config
from vaultsync.control.lease import current_epoch
from vaultsync.engine.catalog import read_only
from vaultsync.engine.volume import has_volume, read_local_header
from vaultsync.format.header import VolumeHeader
from vaultsync.format.state_layout import StateDir
from vaultsync.store.objectstore import ObjectStore, StoreError
from vaultsync.store.targets import open_stores, probe_target


def _catalog_numbers(state_dir: Path) -> dict[str, Any]:
    with read_only(StateDir(state_dir).catalog) as cat:
        counts = cat.counts(("inodes", "chunks"))
        return {
            "last_lsn": cat.last_lsn(),
            "epoch": int(cat.get_meta("epoch") or 0),
            "inodes": counts["inodes"],
            "chunks": counts["chunks"],
            "sealed_segments": len(cat.sealed_segments()),
            "watermarks": {
                target: {"segno": segno, "lsn": lsn, "updated_ns": when}
                for target, (segno, lsn, when) in cat.watermarks().items()
            },
        }


async def gather_status(cfg: Config, probe: bool = True) -> dict[str, Any]:
    state_dir = cfg.volume.state_dir
    header: VolumeHeader | None = None
    volume: dict[str, Any] = {"name": cfg.volume.name, "state_dir": str(state_dir)}
    numbers: dict[str, Any] = {"last_lsn": 0, "epoch": 0, "watermarks": {}}
    if has_volume(state_dir):
        header = read_local_header(state_dir)
        numbers = await asyncio.to_thread(_catalog_numbers, state_dir)
        journal = StateDir(state_dir).journal
        volume.update(
            initialized=True,
            volume_id=header.volume_id_hex,
            format_version=header.format_version,
            encrypted=header.encryption is not None,
            chunk_size=header.chunk_size,
            journal_bytes=sum(p.stat().st_size for p in journal.glob("*.seg")),
            **{k: v for k, v in numbers.items() if k != "watermarks"},
        )
    else:
        volume["initialized"] = False
    targets: list[dict[str, Any]] = []
    health: list[str] = ["not probed"] * len(cfg.targets)
    leases: list[int | None] = [None] * len(cfg.targets)
    if probe and cfg.targets:
        async with open_stores(cfg, connect_timeout=3, max_attempts=1) as stores:
            health = list(await asyncio.gather(*(probe_target(s, header) for s in stores)))
            leases = list(await asyncio.gather(*(_lease_epoch(s) for s in stores)))
    # Fenced: a target holds a writer lease newer than this site's epoch (a promotion
    # elsewhere). The mount would refuse writes; `vaultsync salvage` lists what is unshipped.
    newer = [(e, t.name) for t, e in zip(cfg.targets, leases, strict=True) if e is not None]
    if header is not None and newer and max(newer)[0] > numbers["epoch"]:
        volume["fenced"] = {"lease_epoch": max(newer)[0], "target": max(newer)[1]}
    else:
        volume["fenced"] = None
    live = live_replication(state_dir)
    volume["mounted"] = live is not None
    volume["failover"] = _failover(cfg, volume, leases)
    if volume["failover"].get("live"):
        volume["mounted"] = True
    for t, h in zip(cfg.targets, health, strict=True):
        wm = numbers["watermarks"].get(t.name, {"lsn": 0})
        row: dict[str, Any] = {
            "name": t.name,
            "endpoint": t.endpoint,
            "bucket": t.bucket,
            "prefix": t.prefix,
            "mode": t.mode,
            "effective_mode": t.mode,
            "probe": h,
            "health": h if h != "ok" else "healthy",
            "lease_epoch": leases[len(targets)],
            "watermark_lsn": wm["lsn"],
            "lag_lsn": max(0, numbers["last_lsn"] - wm["lsn"]),
            "lag_bytes": None,
            "lag_seconds": None,
            "queue_segments": None,
            "last_error": "",
        }
        # While mounted, the daemon's own view is fresher than the catalog's.
        if live is not None and t.name in live["targets"]:
            lt = live["targets"][t.name]
            row.update({k: lt[k] for k in lt if k in row or k in ("reason", "uploaded_bytes")})
        targets.append(row)
    return {"volume": volume, "targets": targets}


def _failover(cfg: Config, volume: dict[str, Any], leases: list[int | None]) -> dict[str, Any]:
    """This site's role: the daemon's own account while it runs (failover.json), else
    what the state directory and the targets' leases say."""
    path = StateDir(cfg.volume.state_dir).failover_status
    try:
        snap: dict[str, Any] = json.loads(path.read_text())
        if time.time() - float(snap.get("updated_at", 0)) <= 10:
            snap["live"] = True
            return snap
    except (OSError, ValueError):
        pass
    out: dict[str, Any] = {"mode": cfg.failover.mode, "site": cfg.site.name, "live": False}
    known = [e for e in leases if e is not None]
    if StateDir(cfg.volume.state_dir).standby.exists():
        out["role"] = "standby"
    elif volume.get("initialized"):
        newest = max(known, default=volume.get("epoch", 0))
        out["role"] = "fenced" if newest > volume.get("epoch", 0) else "writer"
        out["epoch"] = volume.get("epoch", 0)
    else:
        out["role"] = None
    if known:
        out["epoch"] = max(known)
    return out


async def _lease_epoch(store: ObjectStore) -> int | None:
    """The newest writer lease at a target; None when it cannot be read."""
    try:
        return await current_epoch(store)
    except StoreError:
        return None


def live_replication(state_dir: Path) -> dict[str, Any] | None:
    """The mount daemon's replication snapshot, if a daemon is running and writing it."""
    path = StateDir(state_dir).replication_status
    try:
        snap: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if time.time() - float(snap.get("updated_at", 0)) > 10:
        return None  # stale: the daemon is gone
    return snap
