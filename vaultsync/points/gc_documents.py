"""The documents garbage collection leaves at a target, read back (docs/format.md §2.6).

`retained.json` says which points a target still holds; `relocations/<segno>.json`
says where the live chunks of a deleted segment went. replication/gc.py writes
them; a rebuild, a recovered volume's reads and `vaultsync points` read them.
"""

from __future__ import annotations

import json

from vaultsync.engine.journal import Location
from vaultsync.errors import FormatError
from vaultsync.format.bucket_layout import RETAINED_KEY, relocation_key
from vaultsync.points.retention import Retained
from vaultsync.store.objectstore import ObjectMissingError, ObjectStore


async def read_retained(store: ObjectStore) -> Retained | None:
    """What GC keeps recoverable at this target (§2.6); None if GC never ran there."""
    try:
        doc = json.loads(await store.get(RETAINED_KEY))
        return Retained.from_json(doc)
    except ObjectMissingError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"target {store.name!r}: {RETAINED_KEY} is malformed ({e})") from None


async def read_relocation(store: ObjectStore, segno: int) -> dict[bytes, Location]:
    """Where the chunks of GC-deleted segment `segno` went; empty if it left no record."""
    try:
        doc = json.loads(await store.get(relocation_key(segno)))
        return {
            bytes.fromhex(k): Location(int(v[0]), int(v[1]), int(v[2]))
            for k, v in doc["chunks"].items()
        }
    except ObjectMissingError:
        return {}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise FormatError(
            f"target {store.name!r}: {relocation_key(segno)} is malformed ({e})"
        ) from None
