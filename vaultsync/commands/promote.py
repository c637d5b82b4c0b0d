"""`vaultsync promote`: this site becomes the writer, rebuilt from one target."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from vaultsync.commands.console import ConfigArg, out, passphrase
from vaultsync.config import load_config


def promote(
    config: ConfigArg,
    from_target: Annotated[str, typer.Option("--from", help="The target to rebuild from.")],
    force: Annotated[
        bool, typer.Option(help="Move an existing local volume aside (kept for salvage).")
    ] = False,
) -> None:
    """Make this site the writer: take the lease (epoch + 1), rebuild from the target."""
    from vaultsync.control.promote import promote as run_promote

    cfg = load_config(config)
    r = asyncio.run(run_promote(cfg, from_target, passphrase(cfg), force=force))
    out.print(
        f"promoted: this site now writes epoch {r.epoch} of {cfg.volume.name}, rebuilt from "
        f"{from_target} at LSN {r.lsn} ({r.segments} segments"
        + (f", open segment {r.sealed_tail} sealed here" if r.sealed_tail else "")
        + f"); lease taken at {', '.join(r.leased_at)}"
    )
    if r.moved_aside:
        out.print(f"the previous local volume was moved to {r.moved_aside}")
    out.print(f"mount it with: vaultsync mount {config} MOUNTPOINT")
