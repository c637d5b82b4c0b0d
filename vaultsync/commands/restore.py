"""`vaultsync restore`: files as they were at a point, copied out of one target."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from vaultsync.commands.console import ConfigArg, err, out, passphrase
from vaultsync.config import load_config


def restore(
    config: ConfigArg,
    path: Annotated[str, typer.Argument(help="File or directory inside the volume, e.g. /home.")],
    dest: Annotated[Path, typer.Argument(help="Local directory or file name to restore to.")],
    from_target: Annotated[str, typer.Option("--from", help="The target to restore from.")],
    at: Annotated[
        str | None, typer.Option(help="An LSN, an ISO-8601 time, or a snapshot (default: newest).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite files that differ at DEST.")] = False,
    parallel: Annotated[int, typer.Option(min=1, max=64, help="Files copied at once.")] = 8,
    bwlimit: Annotated[
        str | None,
        typer.Option(help="At most this many bytes per second, e.g. 50M (default: no cap)."),
    ] = None,
) -> None:
    """Copy PATH as it was at a point out of a target into DEST (resumable)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from vaultsync.points.restore import restore as run_restore
    from vaultsync.store.ratelimit import parse_rate

    cfg = load_config(config)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("restoring", total=None)
        report = asyncio.run(
            run_restore(
                cfg,
                from_target,
                at,
                path,
                dest,
                passphrase(cfg),
                force=force,
                parallel=parallel,
                bwlimit=parse_rate(bwlimit),
                progress=lambda n: bar.advance(task, n),
                total=lambda n: bar.update(task, total=n),
            )
        )
    out.print(
        f"restored {path} as of LSN {report.lsn} into {dest}: {report.files} files "
        f"({report.bytes / 1e6:.1f} MB), {report.dirs} directories, {report.symlinks} symlinks, "
        f"{report.links} hard links; {report.skipped} already there"
    )
    for e in report.errors:
        err.print(f"warning: {e}")
