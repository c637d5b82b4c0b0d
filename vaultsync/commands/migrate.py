"""`vaultsync migrate`: a volume copied from one provider to another, live or offline.

The copying is replication/migrate.py's; this is its progress bar and report,
and (unless --no-adopt) the running mount told to ship to the new target.
Exit code 2 when anything failed to copy.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from vaultsync.commands.console import ConfigArg, err, out, passphrase, print_json
from vaultsync.config import load_config


def migrate(
    config: ConfigArg,
    from_target: Annotated[str, typer.Option("--from", help="Target to copy from.")],
    to_target: Annotated[
        str, typer.Option("--to", help="Target to copy to (in the config, may be empty).")
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would move.")] = False,
    jobs: Annotated[int, typer.Option(min=1, max=64, help="Objects fetched at once.")] = 4,
    bwlimit: Annotated[
        str | None, typer.Option(help="Bandwidth cap in bytes/s, e.g. 10M or 512K.")
    ] = None,
    max_lag: Annotated[
        int, typer.Option(min=0, help="Stop catching up once a round copies this few segments.")
    ] = 2,
    adopt: Annotated[
        bool, typer.Option(help="Have a running mount start shipping to the new target.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
) -> None:
    """Copy the volume from one target to another: verified, resumable, live or offline."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bar

    from vaultsync.replication.migrate import Progress
    from vaultsync.replication.migrate import migrate as run_migrate
    from vaultsync.store.ratelimit import parse_rate

    cfg = load_config(config)
    limit = parse_rate(bwlimit)

    with Bar(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[done]}/{task.fields[objects]} objects"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=as_json or dry_run,
    ) as bar:
        # One task: its completed/total are bytes (rate, ETA); objects ride along as fields.
        task = bar.add_task(f"{from_target} → {to_target}", total=0, done=0, objects=0)

        class BarProgress(Progress):  # type: ignore[misc]
            def planned(self, n: int, b: int) -> None:
                t = bar.tasks[task]
                bar.update(task, total=(t.total or 0) + b, objects=t.fields["objects"] + n)

            def advanced(self, n: int, b: int) -> None:
                bar.update(task, advance=b, done=bar.tasks[task].fields["done"] + n)

            def note(self, text: str) -> None:
                bar.update(task, description=f"{from_target} → {to_target}: {text}")

        report = asyncio.run(
            run_migrate(
                cfg,
                from_target,
                to_target,
                passphrase=passphrase(cfg),
                jobs=jobs,
                bwlimit=limit,
                dry_run=dry_run,
                max_lag=max_lag,
                progress=BarProgress(),
            )
        )
    adopted = ""
    if adopt and not dry_run and report.ok:
        from vaultsync.commands.targets_admin import reload_daemon
        from vaultsync.control.status import live_replication

        live = live_replication(cfg.volume.state_dir)
        if live is not None and to_target not in live.get("targets", {}):
            adopted = reload_daemon(cfg, {to_target}, set())
    if as_json:
        print_json({**asdict(report), "ok": report.ok, "adopted": adopted})
    else:
        _print_report(report, adopted)
    if not report.ok:
        raise typer.Exit(2)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _print_report(r: Any, adopted: str) -> None:
    if r.dry_run:
        table = Table("kind", "to copy", "bytes", "already at " + r.dest)
        for kind, s in r.plan.items():
            table.add_row(kind, str(s["copy"]), _mb(s["copy_bytes"]), str(s["present"]))
        out.print(f"dry run: {r.source} → {r.dest}; nothing was written")
        out.print(table)
        for item in r.would_copy:
            out.print(f"  would {item['action']:5} {item['key']}  ({item['size']} bytes)")
        return
    out.print(
        f"migrated {r.source} → {r.dest} in {r.seconds:.1f}s ({r.rounds} round(s)): "
        f"copied {r.copied} objects ({_mb(r.copied_bytes)}), "
        f"skipped {r.skipped} already there ({_mb(r.skipped_bytes)}), "
        f"verified {r.verified}, failed {len(r.failed)}"
    )
    for key, where in r.repaired_from.items():
        out.print(f"  {key}: damaged at {r.source}, good copy taken from {where}")
    for key in r.withdrawn:
        out.print(f"  {key}: deleted at {r.source} during the migration, removed from {r.dest}")
    for f in r.failed:
        err.print(
            Text.assemble(("failed:", "bold red"), f" {f['key']}: {f['reason']}"), highlight=False
        )
    if r.deferred:
        err.print(
            f"{len(r.deferred)} object(s) held back so that {r.dest} stays a consistent "
            "prefix; fix the failure above and run migrate again"
        )
    if adopted:
        out.print(adopted)
