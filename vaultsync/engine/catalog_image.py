"""The catalog as a checkpoint holds it: an image built from the live file, read back.

A checkpoint (docs/format.md §2.5) is the catalog's own SQLite file as of one
LSN, so it has the catalog's schema (catalog.py) and is read with the same
queries, through `read_only`. The image leaves out what describes this site
rather than the volume. Every function here blocks: callers run them off the
event loop.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from vaultsync.engine.catalog import read_only

# Tables that describe this site, not the volume: emptied in the image.
LOCAL_TABLES = ("watermarks",)


def build_image(catalog: Path) -> tuple[int, bytes]:
    """A consistent copy of the committed catalog at `catalog`: (its last LSN, the bytes).

    VACUUM INTO reads one snapshot of the file, so the writer may go on committing
    meanwhile; what it commits later is not in the image, and `last_lsn` says where
    the image stands.
    """
    with tempfile.TemporaryDirectory(prefix="vaultsync-ckpt-") as tmp:
        out = Path(tmp) / "image.db"
        src = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
        try:
            src.execute("VACUUM INTO ?", (str(out),))
        finally:
            src.close()
        db = sqlite3.connect(out)
        try:
            for t in LOCAL_TABLES:
                db.execute(f"DELETE FROM {t}")
            db.execute("DELETE FROM meta WHERE key = 'epoch'")
            db.commit()
            row = db.execute("SELECT value FROM meta WHERE key='last_lsn'").fetchone()
            lsn = int(row[0]) if row else 0
            db.execute("PRAGMA journal_mode=DELETE")
        finally:
            db.close()
        return lsn, out.read_bytes()


def image_chunk_ids(image: bytes) -> set[bytes]:
    """The chunks the tree of a checkpoint image refers to (what GC keeps for it)."""
    with tempfile.TemporaryDirectory(prefix="vaultsync-gc-") as tmp:
        path = Path(tmp) / "image.db"
        path.write_bytes(image)
        with read_only(path) as cat:
            return cat.tree_chunks()


def image_schema(path: Path) -> int | None:
    """The schema version of the image at `path`; None if it is no catalog at all."""
    try:
        with read_only(path) as cat:
            version = cat.get_meta("schema_version")
    except sqlite3.Error:
        return None
    return None if version is None else int(version)
