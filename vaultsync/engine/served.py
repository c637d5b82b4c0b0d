"""What `FileSystem` needs from the volume it serves, declared.

Two kinds of volume are served: the live `Volume` (engine/volume.py), and a
point in time rebuilt from a target (points/recovered.py), which the FUSE
mount, restore and the API read through the same `FileSystem`. Both satisfy
this protocol as they are, so neither has to pretend to be the other.

Read-only is part of the contract, not a stub: while `read_only` is True,
`commit_nowait` raises instead of committing (the live volume its failure, a
`ReadOnlyVolumeError` once fenced; a point in time `FsError(EROFS)`), and
`FileSystem` makes no write of its own accord (no atime update). A point in
time is read-only from the start and stays so; a live volume becomes read-only
when it is fenced or its journal's disk fails, and reads go on either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from vaultsync.engine.catalog import Catalog
from vaultsync.engine.volume import PreparedChunk
from vaultsync.format.header import VolumeHeader
from vaultsync.format.patch import PatchPlan
from vaultsync.format.txn import Op


class ServedVolume(Protocol):
    @property
    def header(self) -> VolumeHeader: ...

    @property
    def catalog(self) -> Catalog: ...

    @property
    def state_dir(self) -> Path:
        """Where the volume's local files are: statfs reports that disk's space."""
        ...

    @property
    def last_lsn(self) -> int:
        """The newest transaction the volume holds (for a point in time, the point)."""
        ...

    @property
    def read_only(self) -> bool:
        """No write is accepted (see the module docstring); reads go on."""
        ...

    @property
    def catalog_stale(self) -> bool:
        """The catalog may answer from before changes the journal holds: refuse to answer."""
        ...

    @property
    def writes_patches(self) -> bool:
        """Blocks rewritten in part may be stored as patches of their old chunk."""
        ...

    # Set while synchronous targets are attached: sends what is committed up to a
    # journal position ahead of an expected fsync (Volume.ship_now). None: none.
    replicate_soon: Callable[[tuple[int, int], int], None] | None

    async def read_chunk(self, cid: bytes) -> bytes: ...

    async def read_chunks(self, cids: Sequence[bytes]) -> list[bytes]: ...

    async def prepare_chunks(
        self, blocks: Sequence[bytes], plans: Sequence[PatchPlan | None] = ()
    ) -> list[PreparedChunk]: ...

    async def patch_plan(self, cid: bytes) -> PatchPlan | None: ...

    def commit_nowait(self, ops: Iterable[Op], chunks: Sequence[PreparedChunk] = ()) -> int: ...

    async def sync(self) -> None: ...

    def ship_now(self) -> None: ...
