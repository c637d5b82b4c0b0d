"""`vaultsync init`: the volume created here and its header written to every target."""

from __future__ import annotations

import asyncio

from rich.text import Text

from vaultsync.commands.console import ConfigArg, out, passphrase
from vaultsync.config import load_config


def init(config: ConfigArg) -> None:
    """Create the volume locally and write its header to every target."""
    from vaultsync.store.targets import init_volume

    cfg = load_config(config)
    report = asyncio.run(init_volume(cfg, passphrase(cfg)))
    h = report.header
    verb = "created" if report.created_locally else "already exists"
    out.print(
        Text.assemble(
            "volume ", (h.name, "bold"), f" ({h.volume_id_hex}) {verb} in {cfg.volume.state_dir}"
        )
    )
    for name, state in report.targets.items():
        out.print(f"  target {name}: header {state}")
