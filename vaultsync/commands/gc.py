"""`vaultsync gc`: retention applied now, here or by the daemon of a mounted volume.

Unmounted, this process takes the state directory's lock and collects itself;
mounted, the lock is the daemon's, so it is asked to collect (SIGUSR1) and its
result is waited for. A dry run needs the volume to itself.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from vaultsync.commands.console import ConfigArg, JsonOption, err, out, passphrase, print_json
from vaultsync.config import load_config
from vaultsync.errors import VaultsyncError


def gc(
    config: ConfigArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would go; change nothing.")
    ] = False,
    as_json: JsonOption = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a mounted volume's daemon.")
    ] = 600.0,
) -> None:
    """Thin old points per [retention] and delete what no retained point needs."""
    from vaultsync.engine.state_lock import VolumeInUseError, read_pid, take_lock
    from vaultsync.engine.volume import has_volume
    from vaultsync.errors import VolumeError
    from vaultsync.replication.gc import gc_mounted, gc_unmounted

    cfg = load_config(config)
    state = cfg.volume.state_dir
    if not has_volume(state):
        raise VolumeError(f"{state} holds no volume; GC runs at the writer's site")
    try:
        lock = take_lock(state)
    except VolumeInUseError:
        pid = read_pid(state)
        if pid is None:
            raise
        if dry_run:
            raise VaultsyncError(
                "--dry-run needs the volume unmounted; a mounted volume's daemon runs GC "
                "itself (retention.gc_interval), or now with `vaultsync gc CONFIG`"
            ) from None
        with err.status("the mount daemon is collecting garbage"):
            result = gc_mounted(state, pid, timeout)
        if not result.get("ok"):
            raise VaultsyncError(f"GC failed: {result.get('error')}") from None
    else:
        try:
            with err.status("collecting garbage"):
                result = asyncio.run(gc_unmounted(cfg, passphrase(cfg), dry_run)).to_json()
        finally:
            lock.close()
    if as_json:
        print_json(result)
        return
    verb = "would delete" if result.get("dry_run") else "deleted"
    out.print(
        f"{verb} {len(result['segments_deleted'])} segment(s) "
        f"({result['bytes_deleted']} bytes) and {result['checkpoints_dropped']} checkpoint(s); "
        f"compacted {len(result['segments_compacted'])} segment(s) "
        f"({result['chunks_moved']} chunks moved); {result['chunks_dropped']} chunks dropped"
    )
    out.print(
        f"retained: {result['retained_points']} checkpoint point(s), replay ranges "
        + ", ".join(f"{r['from_lsn']}..{r['to_lsn'] or 'head'}" for r in result["retained_ranges"])
    )
    if result.get("waiting"):
        out.print(
            f"{len(result['waiting'])} compacted segment(s) go once every target "
            "holds the moved chunks"
        )
