"""A volume's presence at its targets: opening their stores, publishing the header.

`init` must never take over a bucket that already belongs to another volume:
the header is written with a conditional create, and an existing header is
accepted only when it names the same volume id. That check is what stops two
sites from interleaving two histories under one prefix.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from vaultsync.config import Config, TargetConfig
from vaultsync.engine.volume import Volume, has_volume, read_local_header
from vaultsync.errors import VolumeError
from vaultsync.format.header import HEADER_KEY, VolumeHeader, new_header
from vaultsync.store.objectstore import ObjectStore, StoreError


@asynccontextmanager
async def open_stores(
    cfg: Config, *, connect_timeout: float = 5, max_attempts: int = 5
) -> AsyncIterator[list[ObjectStore]]:
    """One store per configured target, closed on exit; credentials resolved up front."""
    async with AsyncExitStack() as stack:
        stores = []
        for t in cfg.targets:
            store = ObjectStore(t, connect_timeout=connect_timeout, max_attempts=max_attempts)
            stores.append(await stack.enter_async_context(store))
        yield stores


async def read_remote_header(store: ObjectStore) -> VolumeHeader | None:
    if await store.head(HEADER_KEY) is None:
        return None
    raw = await store.get(HEADER_KEY)
    return VolumeHeader.from_bytes(raw, f"target {store.name!r}: {HEADER_KEY}")


def foreign_volume_error(
    target: TargetConfig, found: VolumeHeader, ours: VolumeHeader | None
) -> VolumeError:
    """The refusal when a target holds another volume: which one, and what to do instead."""
    where = f"{target.endpoint}/{target.bucket}/{target.prefix}"
    mine = f"this volume ({ours.volume_id_hex})" if ours else "a new volume"
    return VolumeError(
        f"target {target.name!r} ({where}) already holds volume {found.name!r} "
        f"({found.volume_id_hex}), not {mine}; choose another bucket or prefix, "
        "or recover that volume with `vaultsync mount --from`"
    )


HeaderState = Literal["created", "present"]


@dataclass
class InitReport:
    header: VolumeHeader
    created_locally: bool
    targets: dict[str, HeaderState]


async def publish_header(
    store: ObjectStore, target: TargetConfig, header: VolumeHeader
) -> HeaderState:
    if await store.create_if_absent(HEADER_KEY, header.to_bytes()):
        return "created"
    found = await read_remote_header(store)
    if found is None or found.volume_id != header.volume_id:
        if found is None:
            raise VolumeError(
                f"target {target.name!r}: the volume header vanished while init wrote it; "
                "another process is using this bucket. Stop it and run init again"
            )
        raise foreign_volume_error(target, found, header)
    return "present"


async def init_volume(cfg: Config, passphrase: str | None) -> InitReport:
    """Create the volume locally (unless it exists) and publish its header to every target.

    Re-running init is safe: it adds the header to targets that lack it (a new
    target in the config) and changes nothing else.
    """
    state_dir = cfg.volume.state_dir
    local = read_local_header(state_dir) if has_volume(state_dir) else None
    async with open_stores(cfg) as stores:
        # First look everywhere, then write anything: a refusal must leave no trace.
        for store in stores:
            await store.check_bucket()
        remote = await asyncio.gather(*(read_remote_header(s) for s in stores))
        for t, found in zip(cfg.targets, remote, strict=True):
            if found is not None and (local is None or found.volume_id != local.volume_id):
                raise foreign_volume_error(t, found, local)
        created = local is None
        if local is None:
            local = new_header(
                cfg.volume.name,
                cfg.volume.chunk_size,
                cfg.volume.compression_level,
                passphrase if cfg.volume.encryption else None,
            )
            vol = await Volume.create(
                state_dir,
                local,
                passphrase,
                segment_size=cfg.volume.segment_size,
                segment_max_age=cfg.volume.segment_max_age,
            )
            await vol.close()
        else:
            # Fail now, not at mount time, when the passphrase does not unlock.
            local.unlock(passphrase)
        header = local
        states = await asyncio.gather(
            *(publish_header(s, t, header) for s, t in zip(stores, cfg.targets, strict=True))
        )
    return InitReport(
        header, created, {t.name: st for t, st in zip(cfg.targets, states, strict=True)}
    )


async def probe_target(store: ObjectStore, header: VolumeHeader | None) -> str:
    """A short word on a target for `status`: reachable and holding our header?"""
    try:
        found = await read_remote_header(store)
    except StoreError as e:
        return f"error: {e.reason}"
    if found is None:
        return "no header (run vaultsync init)"
    if header is not None and found.volume_id != header.volume_id:
        return f"holds another volume ({found.volume_id_hex})"
    return "ok"
