"""The local state directory: the name of everything in it, in one place.

The twin of bucket_layout.py for the site's own disk (docs/format.md §8). Not a
contract between sites: another site never reads this directory. Nothing here
does I/O; the modules that own each file read and write it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HEADER = "volume.json"  # a copy of the volume header; its presence marks a complete volume
CATALOG = "catalog.db"  # the SQLite catalog (engine/catalog.py)
JOURNAL = "journal"  # <segno>.seg, the local segments (engine/journal.py)
LOCK = "mount.lock"  # held with flock() by the one process that has the volume open
PID = "mount.pid"  # "PID\nMOUNTPOINT" of that process
LOG = "mount.log"  # the mount daemon's log in daemon mode
REPLICATION_STATUS = "replication.json"  # per-target status, rewritten by the daemon
GC_CACHE = "gc"  # chunk ids that immutable objects refer to (replication/gc.py)
MIGRATIONS = "migrate"  # resume journals of `vaultsync migrate`
# A standby's copy of the volume header: its presence (and volume.json's absence)
# marks the directory as a standby's warm copy, which no manual-mode mount opens.
STANDBY = "standby.json"
FAILOVER_STATUS = "failover.json"  # the site's role in automatic failover, rewritten each second


@dataclass(frozen=True)
class StateDir:
    """Paths under one state directory."""

    root: Path

    @property
    def header(self) -> Path:
        return self.root / HEADER

    @property
    def catalog(self) -> Path:
        return self.root / CATALOG

    @property
    def journal(self) -> Path:
        return self.root / JOURNAL

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def pid(self) -> Path:
        return self.root / PID

    @property
    def log(self) -> Path:
        return self.root / LOG

    @property
    def replication_status(self) -> Path:
        return self.root / REPLICATION_STATUS

    @property
    def gc_cache(self) -> Path:
        return self.root / GC_CACHE

    @property
    def failover_status(self) -> Path:
        return self.root / FAILOVER_STATUS

    @property
    def standby(self) -> Path:
        return self.root / STANDBY

    @property
    def migrations(self) -> Path:
        return self.root / MIGRATIONS
