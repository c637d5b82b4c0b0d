"""`vaultsync salvage`: what a fenced writer changed that no target received."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from vaultsync.commands.console import ConfigArg, JsonOption, out, passphrase, print_json
from vaultsync.config import load_config


def salvage(
    config: ConfigArg,
    dest: Annotated[
        Path | None,
        typer.Option("--out", help="Copy the salvaged files here (default: only list them)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """After a promotion elsewhere: the files this site changed that no target received."""
    from vaultsync.control.salvage import salvage as run_salvage

    cfg = load_config(config)
    r = asyncio.run(run_salvage(cfg, passphrase(cfg), dest))
    if as_json:
        print_json({**r.__dict__, "files": [list(f) for f in r.files]})
        return
    gone = f"; {r.gone} changed file(s) no longer exist here" if r.gone else ""
    out.print(
        f"transactions {r.shipped_lsn + 1}..{r.last_lsn} never reached a target as whole "
        f"segments: {len(r.files)} file(s){gone}"
    )
    for path, size in r.files:
        out.print(f"  {path}  ({size} bytes)")
    if dest is not None:
        out.print(f"copied {r.copied} file(s) into {dest}")
