"""The writer's heartbeat document, `heartbeat/<epoch>.json` (docs/format.md §2.7).

A standby judges the writer alive by seeing this object change; the fields say
who the writer is and the timing it keeps, so that a standby with another
configuration judges it by the writer's own hold. Bucket contents are
untrusted: decoding is bounded and every field is checked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from vaultsync.errors import FormatError

MAX_SIZE = 4096  # a heartbeat is a few hundred bytes; anything larger is not one


@dataclass(frozen=True)
class Heartbeat:
    epoch: int
    site: str
    run: str  # random hex, new for each writer process
    counter: int  # increases with every renewal of that process
    hold: float
    probation: float
    heartbeat_every: float
    written_ns: int  # informative only: liveness is never judged by comparing clocks
    # The writer's voters as "bucket/prefix": a standby configured with other voters
    # would count another majority, so it refuses to take over (§2.7).
    voters: tuple[str, ...] = ()

    def to_bytes(self) -> bytes:
        doc = asdict(self)
        doc["voters"] = list(self.voters)
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Heartbeat:
        if len(raw) > MAX_SIZE:
            raise FormatError(f"{where}: {len(raw)} bytes is not a heartbeat (at most {MAX_SIZE})")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise FormatError(f"{where}: a heartbeat must be JSON") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{where}: a heartbeat must be a JSON object")
        return cls(
            epoch=_field(doc, "epoch", int, where),
            site=_field(doc, "site", str, where),
            run=_field(doc, "run", str, where),
            counter=_field(doc, "counter", int, where),
            hold=float(_field(doc, "hold", (int, float), where)),
            probation=float(_field(doc, "probation", (int, float), where)),
            heartbeat_every=float(_field(doc, "heartbeat_every", (int, float), where)),
            written_ns=_field(doc, "written_ns", int, where),
            voters=_voters(doc.get("voters", []), where),
        )


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise FormatError(f"{where}: field {name!r} is missing or of the wrong type")
    if isinstance(value, str) and len(value) > 256:
        raise FormatError(f"{where}: field {name!r} is too long")
    if isinstance(value, int | float) and not 0 <= value < 2**63:
        raise FormatError(f"{where}: field {name!r} is out of range")
    return value


def _voters(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise FormatError(f"{where}: field 'voters' must be a list of at most 64 names")
    if not all(isinstance(v, str) and len(v) <= 1100 for v in value):
        raise FormatError(f"{where}: field 'voters' must hold names")
    return tuple(value)


def voter_identity(bucket: str, prefix: str) -> str:
    """How a voter is named across sites: endpoints differ from site to site, buckets
    and prefixes do not."""
    return f"{bucket}/{prefix}"
