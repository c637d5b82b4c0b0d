"""Checkpoints: compact catalog images in the buckets, so recovery need not replay everything.

A checkpoint as of LSN L is the catalog with every transaction up to L applied
(docs/format.md §2.5). It is uploaded to a target only once that target holds
whole segments up to L: a checkpoint never refers to a chunk the target lacks.
Building, the per-target upload that keeps that rule, and the final checkpoint
at unmount are in replicator.py (`Replicator._send_checkpoints`).
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

from vaultsync.engine.lowprio import in_background
from vaultsync.engine.volume import Volume
from vaultsync.format import segment as seg
from vaultsync.format.state_layout import StateDir

# Tables that describe this site, not the volume: emptied in the image.
_LOCAL_TABLES = ("watermarks",)


def _image(catalog: Path) -> tuple[int, bytes]:
    """A consistent copy of the committed catalog: (its last LSN, the SQLite bytes)."""
    with tempfile.TemporaryDirectory(prefix="vaultsync-ckpt-") as tmp:
        out = Path(tmp) / "image.db"
        src = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
        try:
            src.execute("VACUUM INTO ?", (str(out),))
        finally:
            src.close()
        db = sqlite3.connect(out)
        try:
            for t in _LOCAL_TABLES:
                db.execute(f"DELETE FROM {t}")
            db.execute("DELETE FROM meta WHERE key = 'epoch'")
            db.commit()
            row = db.execute("SELECT value FROM meta WHERE key='last_lsn'").fetchone()
            lsn = int(row[0]) if row else 0
            db.execute("PRAGMA journal_mode=DELETE")
        finally:
            db.close()
        return lsn, out.read_bytes()


async def build_checkpoint(vol: Volume) -> tuple[int, int, bytes] | None:
    """(LSN, commit time, object bytes) of a checkpoint of the catalog as it is now."""
    vol.catalog.commit()
    lsn, image = await in_background(_image, StateDir(vol.state_dir).catalog)
    if lsn == 0:
        return None
    when = vol.committed_at(lsn) or time.time_ns()
    rec = await in_background(vol.codec.checkpoint_record, image, lsn, when)
    return lsn, when, seg.encode_record(rec)
