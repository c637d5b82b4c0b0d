"""What `vaultsync status` reports, gathered without disturbing a running mount.

The catalog is read through a read-only SQLite connection (WAL lets it sit
beside the writer), so status never runs recovery or takes the volume's
lock. The numbers here are the ones the REST API and metrics will expose.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from vaultsync.config import Config
from vaultsync.header import VolumeHeader
from vaultsync.targets import open_stores, probe_target
from vaultsync.volume import CATALOG_FILE, JOURNAL_DIR, has_volume, read_local_header


def _catalog_numbers(state_dir: Path) -> dict[str, Any]:
    path = state_dir / CATALOG_FILE
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        q = db.execute

        def one(sql: str) -> Any:
            row = q(sql).fetchone()
            return row[0] if row else None

        return {
            "last_lsn": int(one("SELECT value FROM meta WHERE key='last_lsn'") or 0),
            "inodes": one("SELECT count(*) FROM inodes"),
            "chunks": one("SELECT count(*) FROM chunks"),
            "sealed_segments": one("SELECT count(*) FROM segments WHERE sealed=1"),
            "watermarks": {
                r[0]: {"segno": r[1], "lsn": r[2], "updated_ns": r[3]}
                for r in q("SELECT target, segno, lsn, updated_ns FROM watermarks")
            },
        }
    finally:
        db.close()


async def gather_status(cfg: Config, probe: bool = True) -> dict[str, Any]:
    state_dir = cfg.volume.state_dir
    header: VolumeHeader | None = None
    volume: dict[str, Any] = {"name": cfg.volume.name, "state_dir": str(state_dir)}
    numbers: dict[str, Any] = {"last_lsn": 0, "watermarks": {}}
    if has_volume(state_dir):
        header = read_local_header(state_dir)
        numbers = await asyncio.to_thread(_catalog_numbers, state_dir)
        journal = state_dir / JOURNAL_DIR
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
    targets = []
    health: list[str] = ["not probed"] * len(cfg.targets)
    if probe and cfg.targets:
        async with open_stores(cfg, connect_timeout=3, max_attempts=1) as stores:
            health = list(await asyncio.gather(*(probe_target(s, header) for s in stores)))
    for t, h in zip(cfg.targets, health, strict=True):
        wm = numbers["watermarks"].get(t.name, {"lsn": 0})
        targets.append(
            {
                "name": t.name,
                "endpoint": t.endpoint,
                "bucket": t.bucket,
                "prefix": t.prefix,
                "mode": t.mode,
                "health": h,
                "watermark_lsn": wm["lsn"],
                "lag_lsn": max(0, numbers["last_lsn"] - wm["lsn"]),
            }
        )
    return {"volume": volume, "targets": targets}
