"""Object keys of the bucket layout (docs/format.md §2), relative to a target's prefix.

Pure functions: the one place that spells key names, so the writer, the
readers and the docs cannot drift apart.
"""

from __future__ import annotations

import re

from vaultsync.format.header import HEADER_KEY

__all__ = ["HEADER_KEY", "contiguous_end", "segment_key", "tail_key"]
SEGMENTS = "segments/"
TAILS = "tails/"

_SEG_RE = re.compile(r"^segments/([0-9a-f]{16})\.seg$")
_TAIL_RE = re.compile(r"^tails/([0-9a-f]{16})/([0-9a-f]{16})-([0-9a-f]{16})\.part$")


def segment_key(segno: int) -> str:
    return f"{SEGMENTS}{segno:016x}.seg"


def parse_segment_key(key: str) -> int | None:
    m = _SEG_RE.match(key)
    return int(m.group(1), 16) if m else None


def tail_prefix(segno: int) -> str:
    return f"{TAILS}{segno:016x}/"


def tail_key(segno: int, start: int, end: int) -> str:
    """Bytes [start, end) of the still-open segment `segno` (§2.2)."""
    return f"{tail_prefix(segno)}{start:016x}-{end:016x}.part"


def parse_tail_key(key: str) -> tuple[int, int, int] | None:
    m = _TAIL_RE.match(key)
    if not m:
        return None
    return int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)


def contiguous_end(pieces: list[tuple[int, int]]) -> int:
    """How far from offset 0 the tail pieces (start, end) cover without a gap."""
    end = 0
    for start, stop in sorted(pieces):
        if start > end:
            break
        end = max(end, stop)
    return end


LEASES = "lease/"
_LEASE_RE = re.compile(r"^lease/([0-9a-f]{16})\.json$")


def lease_key(epoch: int) -> str:
    """The writer lease of `epoch` (§2.4); the highest one present is the current writer's."""
    return f"{LEASES}{epoch:016x}.json"


def parse_lease_key(key: str) -> int | None:
    m = _LEASE_RE.match(key)
    return int(m.group(1), 16) if m else None


CHECKPOINTS = "checkpoints/"
_CKPT_RE = re.compile(r"^checkpoints/([0-9a-f]{16})-([0-9a-f]{16})\.ckpt$")


def checkpoint_key(lsn: int, time_ns: int) -> str:
    """The catalog as of `lsn`, committed at `time_ns` (§2.5): both in the name, so a
    reader picks one for an LSN or a time from a listing alone."""
    return f"{CHECKPOINTS}{lsn:016x}-{time_ns:016x}.ckpt"


def parse_checkpoint_key(key: str) -> tuple[int, int] | None:
    m = _CKPT_RE.match(key)
    return (int(m.group(1), 16), int(m.group(2), 16)) if m else None


RETAINED_KEY = "retained.json"
RELOCATIONS = "relocations/"


def relocation_key(segno: int) -> str:
    """Where the chunks of a garbage-collected segment `segno` went (§2.6)."""
    return f"{RELOCATIONS}{segno:016x}.json"


_RELOC_RE = re.compile(r"^relocations/([0-9a-f]{16})\.json$")


def parse_relocation_key(key: str) -> int | None:
    m = _RELOC_RE.match(key)
    return int(m.group(1), 16) if m else None


SNAPSHOTS = "snapshots/"
# A snapshot name as §2.3 allows it: what a key can hold without escaping.
_SNAPSHOT_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_SNAPSHOT_NAME_RE = re.compile(_SNAPSHOT_NAME)
_SNAPSHOT_RE = re.compile(rf"snapshots/({_SNAPSHOT_NAME})\.json")


def is_snapshot_name(name: str) -> bool:
    """1‥128 characters from `A-Z a-z 0-9 . _ -`, starting with a letter or digit (§2.3)."""
    return _SNAPSHOT_NAME_RE.fullmatch(name) is not None


def snapshot_key(name: str) -> str:
    """The named point `name` (§2.3); ValueError unless `is_snapshot_name(name)`."""
    if not is_snapshot_name(name):
        raise ValueError(f"not a snapshot name: {name!r}")
    return f"{SNAPSHOTS}{name}.json"


def parse_snapshot_key(key: str) -> str | None:
    m = _SNAPSHOT_RE.fullmatch(key)
    return m.group(1) if m else None


HEARTBEATS = "heartbeat/"
_HEARTBEAT_RE = re.compile(r"^heartbeat/([0-9a-f]{16})\.json$")


def heartbeat_key(epoch: int) -> str:
    """The heartbeat of the writer of `epoch` (§2.7), rewritten at every renewal."""
    return f"{HEARTBEATS}{epoch:016x}.json"


def parse_heartbeat_key(key: str) -> int | None:
    m = _HEARTBEAT_RE.match(key)
    return int(m.group(1), 16) if m else None
