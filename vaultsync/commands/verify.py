"""`vaultsync verify`: every copy at the targets checked against the local journal.

Exit code 2 when something stays wrong: a copy that could not be healed, a
target that could not be read, or (with --no-heal) anything found at all.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from vaultsync.commands.console import ConfigArg, JsonOption, err, out, print_json
from vaultsync.config import load_config


def verify(
    config: ConfigArg,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    sample: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of segments to check (1 = all).")
    ] = 1.0,
    heal: Annotated[bool, typer.Option(help="Re-upload missing or damaged copies.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Scrub the targets: every segment compared with the local journal, bad copies healed."""
    from rich.progress import Progress

    from vaultsync.replication.verify import verify as run_verify

    cfg = load_config(config)
    with Progress(console=err, transient=True, disable=as_json) as bar:
        task = bar.add_task("verifying segments", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = asyncio.run(
            run_verify(cfg, sample=sample, heal=heal, only=target, progress=progress)
        )
    if as_json:
        from dataclasses import asdict

        print_json({**asdict(report), "clean": report.clean})
    else:
        table = Table("target", "checked", "ok", "missing", "damaged", "healed", "error")
        for t in report.targets:
            table.add_row(
                t.name,
                str(t.checked),
                str(t.ok),
                str(len(t.missing)),
                str(len(t.corrupt)),
                str(len(t.healed)),
                t.error,
            )
        out.print(table)
        if report.local_bad:
            out.print(
                f"local journal: {len(report.local_bad)} damaged segment(s), "
                f"{len(report.local_healed)} restored from a target"
            )
        out.print("all copies verified" if report.clean else "problems found (see above)")
    unhealed = any(t.unhealable or t.error for t in report.targets) or (
        len(report.local_healed) < len(report.local_bad)
    )
    if unhealed or (not heal and not report.clean):
        raise typer.Exit(2)
