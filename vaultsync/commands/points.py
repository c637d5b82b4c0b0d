"""`vaultsync points`: what each target could recover, read from its bucket alone."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.table import Table

from vaultsync.commands.console import ConfigArg, JsonOption, out, print_json, when
from vaultsync.config import load_config


def points(
    config: ConfigArg,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    as_json: JsonOption = False,
) -> None:
    """What each target can recover: LSN range and times (mount --from T --at X takes any)."""
    from vaultsync.points.snapshots import target_points
    from vaultsync.store.objectstore import ObjectStore, StoreError

    cfg = load_config(config)
    names = [target] if target else [t.name for t in cfg.targets]

    async def gather() -> list[dict[str, Any]]:
        res = []
        for n in names:
            try:
                async with ObjectStore(cfg.target(n), max_attempts=2) as st:
                    res.append(await target_points(st))
            except StoreError as e:
                res.append({"target": n, "error": str(e)})
        return res

    found = asyncio.run(gather())
    if as_json:
        print_json(found)
        return
    table = Table("target", "segments", "LSNs", "from", "to", "note")
    for p in found:
        if "error" in p:
            table.add_row(p["target"], "-", "-", "-", "-", p["error"])
        elif p["last_lsn"] is None:
            table.add_row(p["target"], "0", "-", "-", "-", "nothing shipped yet")
        else:
            note = f"+ {p['open_tail_pieces']} tail piece(s)" if p["open_tail_pieces"] else ""
            table.add_row(
                p["target"],
                str(p["segments"]),
                f"{p['first_lsn']}..{p['last_lsn']}",
                when(p["first_time_ns"]),
                when(p["last_time_ns"]),
                note,
            )
    out.print(table)
