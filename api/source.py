"""What the API serves from: one target (standalone) or the mount daemon's live volume.

Standalone (`vaultsync serve --from T`), everything comes from target T: its
points, its snapshots, point views rebuilt from it. Inside the mount daemon
the live head is the daemon's own FileSystem, status carries the live
replication numbers, snapshots may be created and deleted (this is the
writer), and past points are rebuilt from `api.from_target` (default: the
first target). Restores always read from that target, as `vaultsync
restore --from` does.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from vaultsync.config import Config
from vaultsync.control.status import gather_status
from vaultsync.engine.filesystem import FileSystem
from vaultsync.errors import ConfigError
from vaultsync.points.snapshots import (
    create_snapshot,
    delete_snapshot,
    list_snapshots,
    target_points,
)
from vaultsync.store.objectstore import ObjectStore, StoreError
from vaultsync.store.targets import open_stores

from .errors import ApiError
from .jobs import Jobs
from .point_views import PointViews


class Backend:
    def __init__(
        self,
        cfg: Config,
        target: str | None,
        passphrase: str | None,
        live: FileSystem | None = None,
    ) -> None:
        if target is None:
            target = cfg.api.from_target or (cfg.targets[0].name if cfg.targets else None)
        if target is None:
            raise ConfigError("the API needs a target to read points from; add [[targets]]")
        cfg.target(target)  # a clear error for an unknown name
        self.cfg = cfg
        self.target = target
        self.passphrase = passphrase
        self.live = live
        self.writer = live is not None
        self._stack = AsyncExitStack()
        self._tmp: Path | None = None
        self.views: PointViews
        self.jobs = Jobs(cfg, target, passphrase)

    async def start(self) -> None:
        store = await self._stack.enter_async_context(
            ObjectStore(self.cfg.target(self.target), max_attempts=3)
        )
        self._tmp = Path(tempfile.mkdtemp(prefix="vaultsync-api-"))
        self.views = PointViews(
            store,
            self._tmp,
            self.passphrase,
            self.cfg.api.point_cache,
            live=self.live,
            volume_name=self.cfg.volume.name,
        )

    async def close(self) -> None:
        await self.jobs.close()
        if hasattr(self, "views"):
            await self.views.close()
        await self._stack.aclose()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _scope_cfg(self) -> Config:
        """Standalone serves one target: status, points, snapshots are that target's."""
        if self.writer:
            return self.cfg
        return self.cfg.model_copy(update={"targets": [self.cfg.target(self.target)]})

    async def status(self, probe: bool) -> dict[str, Any]:
        st = await gather_status(self._scope_cfg(), probe=probe)
        st["server"] = {"mode": "live" if self.writer else "standalone", "target": self.target}
        return st

    async def points(self) -> dict[str, Any]:
        found: list[dict[str, Any]] = []
        async with open_stores(self._scope_cfg(), max_attempts=2) as stores:
            for st in stores:
                try:
                    found.append(await target_points(st))
                except StoreError as e:
                    found.append({"target": st.name, "error": str(e)})
        out: dict[str, Any] = {"serving_target": self.target, "targets": found}
        if self.live is not None:
            out["live"] = {"last_lsn": self.live.vol.last_lsn}
        return out

    async def snapshots(self) -> list[dict[str, Any]]:
        return await list_snapshots(self._scope_cfg())

    def _need_writer(self) -> None:
        if not self.writer:
            raise ApiError(
                409,
                "read_only",
                f"this server reads target {self.target!r} and is not the writer; create and "
                "delete snapshots through the mount daemon's API ([api] enabled = true) or "
                "`vaultsync snapshot` at the writer",
            )

    async def create_snapshot(self, name: str, lsn: int | None) -> dict[str, Any]:
        self._need_writer()
        assert self.live is not None
        if lsn is None:
            await self.live.flush_all()  # "now" includes what was written before the request
            await self.live.vol.sync()
            lsn = self.live.vol.last_lsn
        elif lsn > self.live.vol.last_lsn:
            raise ApiError(
                400,
                "bad_lsn",
                f"LSN {lsn} is not committed yet (newest: {self.live.vol.last_lsn})",
            )
        made = await create_snapshot(self.cfg, name, lsn)
        await self.views.forget_snapshot(name)  # a view of an older snapshot of that name
        return made

    async def delete_snapshot(self, name: str) -> list[str]:
        self._need_writer()
        gone = await delete_snapshot(self.cfg, name)
        await self.views.forget_snapshot(name)
        return gone
