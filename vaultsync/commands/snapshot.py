"""`vaultsync snapshot create|list|delete`: named points, kept at every target."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from vaultsync.commands.console import ConfigArg, JsonOption, out, print_json, when
from vaultsync.config import load_config

app = typer.Typer(help="Named points in time, kept in the buckets until deleted.")


@app.command("create")
def snapshot_create(
    config: ConfigArg,
    name: Annotated[str, typer.Argument(help="Letters, digits, '.', '_', '-'.")],
    lsn: Annotated[int | None, typer.Option(help="Default: the newest committed LSN.")] = None,
) -> None:
    """Name the volume's current point (or --lsn) at every target."""
    from vaultsync.points.snapshots import create_snapshot

    cfg = load_config(config)
    doc = asyncio.run(create_snapshot(cfg, name, lsn))
    out.print(f"snapshot {name} = LSN {doc['lsn']} at {len(cfg.targets)} target(s)")


@app.command("list")
def snapshot_list(config: ConfigArg, as_json: JsonOption = False) -> None:
    """Every snapshot the targets hold."""
    from vaultsync.points.snapshots import list_snapshots

    snaps = asyncio.run(list_snapshots(load_config(config)))
    if as_json:
        print_json(snaps)
        return
    table = Table("name", "LSN", "created", "targets")
    for s in snaps:
        table.add_row(s["name"], str(s["lsn"]), when(s["created_ns"]), ", ".join(s["targets"]))
    out.print(table)


@app.command("delete")
def snapshot_delete(config: ConfigArg, name: str) -> None:
    """Delete a snapshot at every target (its point may then be thinned by retention)."""
    from vaultsync.points.snapshots import delete_snapshot

    where = asyncio.run(delete_snapshot(load_config(config), name))
    out.print(f"snapshot {name} deleted at {', '.join(where)}")
