"""`vaultsync salvage`: what a fenced writer committed that never reached a target.

After a promotion elsewhere, the old writer keeps its journal. Its
transactions above the newest LSN any target acknowledged as a whole segment
(the watermarks) are the ones the new history may lack. Salvage lists the
files those transactions touched and copies them, as this site last had them,
into a directory, from which a person decides what to put back.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vaultsync.config import Config
from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.posix import FsError
from vaultsync.engine.volume import Volume, has_volume
from vaultsync.errors import VolumeError
from vaultsync.format.txn import DropDirent, SetBlocks, SetDirent, SetInode, SetXattr


@dataclass
class SalvageReport:
    shipped_lsn: int
    last_lsn: int
    files: list[tuple[str, int]] = field(default_factory=list)  # (path, size)
    gone: int = 0  # touched inodes that no longer exist here
    copied: int = 0


async def salvage(cfg: Config, passphrase: str | None, out: Path | None = None) -> SalvageReport:
    state = cfg.volume.state_dir
    if not has_volume(state):
        raise VolumeError(f"{state} holds no volume; nothing to salvage")
    from vaultsync.engine.state_lock import take_lock

    lock = take_lock(state)  # never beside a running mount
    try:
        vol = await Volume.open(state, passphrase)
        try:
            return await _salvage(vol, out)
        finally:
            await vol.close()
    finally:
        lock.close()


async def _salvage(vol: Volume, out: Path | None) -> SalvageReport:
    marks = vol.watermarks()
    shipped = max((lsn for _seg, lsn, _t in marks.values()), default=0)
    report = SalvageReport(shipped, vol.last_lsn)
    touched: set[int] = set()
    for txn in vol.transactions_after(shipped):
        for op in txn.ops:
            if isinstance(op, SetBlocks | SetInode | SetXattr | SetDirent):
                touched.add(op.ino)
            elif isinstance(op, DropDirent):
                touched.add(op.parent)
    fs = FileSystem(vol)
    for ino in sorted(touched):
        try:
            node = fs.getattr(ino)
        except FsError:
            report.gone += 1
            continue
        if not stat.S_ISREG(node.mode):
            continue
        names = vol.path_of(ino)
        if names is None:
            report.gone += 1
            continue
        path = "/" + "/".join(os.fsdecode(n) for n in names)
        report.files.append((path, node.size))
        if out is not None:
            dest = out / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "wb") as f:
                off = 0
                while off < node.size:
                    data = await fs.read(ino, off, 4 << 20)
                    if not data:
                        break
                    f.write(data)
                    off += len(data)
            os.utime(dest, ns=(node.atime_ns, node.mtime_ns))
            report.copied += 1
    return report
