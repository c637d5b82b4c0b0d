"""`vaultsync verify`: scrub every target's segments against the local journal, heal what is bad.

Works beside a running mount: it reads the catalog read-only and the sealed
(immutable) local segment files, and writes only whole, verified segments to
keys that must hold exactly those bytes. The reference copy of a segment is
the local file when it verifies, else any target's copy that verifies
(docs/format.md §4: sealed, every checksum right, this volume, this number).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from vaultsync.config import Config
from vaultsync.engine.catalog import read_only
from vaultsync.engine.journal import replace_segment_file, segment_name
from vaultsync.engine.volume import has_volume, read_local_header
from vaultsync.errors import VolumeError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import parse_segment_key, segment_key
from vaultsync.format.state_layout import StateDir
from vaultsync.store.objectstore import ObjectStore, StoreError


@dataclass
class TargetReport:
    name: str
    checked: int = 0
    ok: int = 0
    missing: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    healed: list[int] = field(default_factory=list)
    unhealable: list[int] = field(default_factory=list)
    error: str = ""


@dataclass
class VerifyReport:
    targets: list[TargetReport]
    local_bad: list[int] = field(default_factory=list)
    local_healed: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.local_bad and all(
            not t.missing and not t.corrupt and not t.error for t in self.targets
        )


def _expected(state_dir: Path) -> tuple[list[tuple[int, int]], dict[str, int]]:
    """Sealed segments (number, size) and each target's watermark, from the catalog."""
    with read_only(StateDir(state_dir).catalog) as cat:
        segs = [(s.segno, s.size) for s in cat.sealed_segments()]
        wms = {target: wm[0] for target, wm in cat.watermarks().items()}
        return segs, wms


def _read_local(state_dir: Path, segno: int) -> bytes | None:
    try:
        return (StateDir(state_dir).journal / segment_name(segno)).read_bytes()
    except OSError:
        return None


async def verify(
    cfg: Config,
    *,
    sample: float = 1.0,
    heal: bool = True,
    only: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    state_dir = cfg.volume.state_dir
    if not has_volume(state_dir):
        raise VolumeError(f"{state_dir} holds no volume; run `vaultsync init CONFIG` first")
    header = read_local_header(state_dir)
    segs, wms = await asyncio.to_thread(_expected, state_dir)
    targets = [t for t in cfg.targets if only is None or t.name == only]
    if only is not None and not targets:
        cfg.target(only)  # raises the "no such target" error
    rng = random.Random()
    chosen = [s for s in segs if sample >= 1.0 or rng.random() < sample]
    report = VerifyReport([TargetReport(t.name) for t in targets])
    async with AsyncExitStack() as stack:
        stores = [await stack.enter_async_context(ObjectStore(t)) for t in targets]
        present: list[set[int] | None] = []
        for st, rep in zip(stores, report.targets, strict=True):
            try:
                keys = {parse_segment_key(o.key) async for o in st.list("segments/")}
                present.append({k for k in keys if k is not None})
            except StoreError as e:
                rep.error = e.reason
                present.append(None)
        done = 0
        for segno, _size in chosen:
            local = await asyncio.to_thread(_read_local, state_dir, segno)
            good: bytes | None = (
                local if local and seg.is_complete_segment(local, header.volume_id, segno) else None
            )
            if local is not None and good is None:
                report.local_bad.append(segno)
            digests: dict[str, str] = {}
            bad_here: list[tuple[int, bool]] = []  # (index, missing?)
            for i, (st, rep, have) in enumerate(zip(stores, report.targets, present, strict=True)):
                if have is None or wms.get(rep.name, 0) < segno:
                    continue  # not reachable, or not shipped there yet: nothing to check
                rep.checked += 1
                if segno not in have:
                    rep.missing.append(segno)
                    bad_here.append((i, True))
                    continue
                try:
                    data = await st.get(segment_key(segno))
                except StoreError as e:
                    rep.error = e.reason
                    continue
                if good is not None:
                    same = hashlib.blake2b(data).digest() == hashlib.blake2b(good).digest()
                else:
                    same = seg.is_complete_segment(data, header.volume_id, segno)
                    if same:
                        good = data
                if same:
                    rep.ok += 1
                    digests[rep.name] = "ok"
                else:
                    rep.corrupt.append(segno)
                    bad_here.append((i, False))
            if heal and good is not None:
                for i, _missing in bad_here:
                    rep = report.targets[i]
                    try:
                        await stores[i].put(segment_key(segno), good)
                        rep.healed.append(segno)
                    except StoreError as e:
                        rep.error = e.reason
                        rep.unhealable.append(segno)
                if segno in report.local_bad or local is None:
                    path = StateDir(state_dir).journal / segment_name(segno)
                    await asyncio.to_thread(replace_segment_file, path, good)
                    report.local_healed.append(segno)
            elif bad_here:
                for i, _ in bad_here:
                    report.targets[i].unhealable.append(segno)
            done += 1
            if progress is not None:
                progress(done, len(chosen))
    return report
