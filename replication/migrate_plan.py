"""What a migration must move: pure planning from two bucket listings, no I/O.

The plan is driven by the *source listing*, not by a list of known key kinds:
the bucket layout grows (garbage collection adds its own keys), and a kind
this version does not know must still arrive at B, byte for byte. Only
`.probe/` and `tails/` are left behind, because they are transient by
contract (docs/format.md §2, §2.2): a tail piece is redundant once its segment
is sealed, and the new target's shipper writes its own tails if it is sync.

Order matters for the consistent-prefix rule (§2.1): the header first (a
conditional create that refuses a foreign volume), then the leases (so a
fenced writer is fenced at B too), then segments in ascending number, then
checkpoints (only once B holds their LSN), snapshots, and unknown kinds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from vaultsync.format.bucket_layout import (
    CHECKPOINTS,
    HEADER_KEY,
    LEASES,
    TAILS,
    parse_checkpoint_key,
    parse_lease_key,
    parse_segment_key,
)
from vaultsync.store.objectstore import PROBE_PREFIX, ObjectInfo

Kind = Literal["header", "lease", "segment", "checkpoint", "snapshot", "other"]
SNAPSHOTS = "snapshots/"
TRANSIENT = (PROBE_PREFIX, TAILS)
# Phases in the order they are copied; within a phase, objects may move in parallel
# except segments, which are uploaded strictly in ascending order.
PHASES: tuple[Kind, ...] = ("header", "lease", "segment", "checkpoint", "snapshot", "other")

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")


def classify(key: str) -> Kind | None:
    """The kind of a key under the prefix, or None for transient keys that never move."""
    if key.startswith(TRANSIENT):
        return None
    if key == HEADER_KEY:
        return "header"
    if key.startswith(LEASES) and parse_lease_key(key) is not None:
        return "lease"
    if parse_segment_key(key) is not None:
        return "segment"
    if key.startswith(CHECKPOINTS) and parse_checkpoint_key(key) is not None:
        return "checkpoint"
    if key.startswith(SNAPSHOTS) and key.endswith(".json"):
        return "snapshot"
    return "other"


def is_plain_md5(etag: str) -> bool:
    """An ETag that is the MD5 of the body (single-part upload), so it can be compared."""
    return bool(_MD5_RE.match(etag.lower()))


@dataclass(frozen=True)
class Item:
    """One object to consider, as the source listed it."""

    key: str
    kind: Kind
    size: int
    etag: str

    @property
    def segno(self) -> int:
        n = parse_segment_key(self.key)
        assert n is not None, self.key
        return n

    @property
    def checkpoint_lsn(self) -> int:
        parsed = parse_checkpoint_key(self.key)
        assert parsed is not None, self.key
        return parsed[0]


@dataclass
class Plan:
    """Per phase, the objects to copy; `present` are already at B and verified cheaply."""

    copy: dict[Kind, list[Item]] = field(default_factory=lambda: {k: [] for k in PHASES})
    present: list[Item] = field(default_factory=list)
    # Keys at B whose size or checksum differs from A's: they need a full look.
    differs: set[str] = field(default_factory=set)

    @property
    def to_copy(self) -> list[Item]:
        return [i for k in PHASES for i in self.copy[k]]

    @property
    def copy_bytes(self) -> int:
        return sum(i.size for i in self.to_copy)

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for k in PHASES:
            items = self.copy[k]
            have = [i for i in self.present if i.kind == k]
            out[k] = {
                "copy": len(items),
                "copy_bytes": sum(i.size for i in items),
                "present": len(have),
                "present_bytes": sum(i.size for i in have),
            }
        return out


def already_at_dest(
    src: ObjectInfo, dst: ObjectInfo | None, journal: Mapping[str, tuple[int, str]]
) -> bool:
    """The cheap resume check: does B hold exactly A's object without reading it?

    Same size and the same MD5 ETag; or, where an ETag is not a plain MD5
    (multipart), the resume journal recorded that this very (size, ETag) at B
    was verified by an earlier run.
    """
    if dst is None or dst.size != src.size:
        return False
    if is_plain_md5(src.etag) and is_plain_md5(dst.etag):
        return src.etag.lower() == dst.etag.lower()
    done = journal.get(src.key)
    return done is not None and done == (dst.size, dst.etag)


def make_plan(
    source: Iterable[ObjectInfo],
    dest: Mapping[str, ObjectInfo],
    journal: Mapping[str, tuple[int, str]] | None = None,
) -> Plan:
    """Sort the source listing into phases; leave out what B already holds."""
    plan = Plan()
    journal = journal or {}
    for o in source:
        kind = classify(o.key)
        if kind is None:
            continue
        item = Item(o.key, kind, o.size, o.etag)
        d = dest.get(o.key)
        if already_at_dest(o, d, journal):
            plan.present.append(item)
            continue
        if d is not None:
            plan.differs.add(o.key)
        plan.copy[kind].append(item)
    plan.copy["segment"].sort(key=lambda i: i.segno)
    plan.copy["checkpoint"].sort(key=lambda i: i.checkpoint_lsn)
    for k in ("lease", "snapshot", "other"):
        plan.copy[k].sort(key=lambda i: i.key)
    return plan


def segments_blocked_after(failed_segno: int, items: Iterable[Item]) -> list[Item]:
    """Segments that must wait once `failed_segno` could not be copied: every later one,
    because B may hold no segment above a gap (§2.1)."""
    return [i for i in items if i.kind == "segment" and i.segno > failed_segno]
