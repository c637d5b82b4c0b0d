"""`vaultsync status`: the volume and each target, from the catalog or the running daemon."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from vaultsync.commands.console import ConfigArg, JsonOption, print_json, print_status
from vaultsync.config import load_config


def status(
    config: ConfigArg,
    as_json: JsonOption = False,
    probe: Annotated[bool, typer.Option(help="Contact each target.")] = True,
) -> None:
    """Show the volume and every target: mode, health, watermark, lag."""
    from vaultsync.control.status import gather_status

    cfg = load_config(config)
    st = asyncio.run(gather_status(cfg, probe=probe))
    if as_json:
        print_json(st)
        return
    print_status(st)
