"""The writer lease: which epoch may advance a volume's history (docs/format.md §2.4).

Epoch 0 is the writer that ran `init`; it needs no object. Promotion at another
site creates `lease/<E+1>.json` with a conditional create at every target, so
two promoters can never both win the same epoch. A writer whose epoch is below
the highest lease at a target is *fenced*: it must stop shipping at once.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from vaultsync.errors import VaultsyncError
from vaultsync.layout import LEASES, lease_key, parse_lease_key
from vaultsync.objectstore import ObjectStore


class FencedError(VaultsyncError):
    """Another site holds a newer writer lease: this one must not advance history."""


async def current_epoch(store: ObjectStore) -> int:
    epochs = [parse_lease_key(o.key) async for o in store.list(LEASES)]
    return max((e for e in epochs if e is not None), default=0)


def lease_doc(epoch: int, from_lsn: int, source: str) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "holder": socket.gethostname(),
        "from_target": source,
        "from_lsn": from_lsn,
        "created_ns": time.time_ns(),
    }


async def take_lease(store: ObjectStore, doc: dict[str, Any]) -> bool:
    """Create the lease of doc["epoch"]; False if someone already holds that epoch."""
    return await store.create_if_absent(lease_key(doc["epoch"]), json.dumps(doc).encode())
