"""CLI for moving a volume between providers: `vaultsync migrate` and `vaultsync targets …`.

Kept apart from cli.py so the replica-set commands live in one place; cli.py
only registers them. Heavy imports stay inside the commands (fast `--help`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from vaultsync.commands.cli import err, out  # cli.py imports this module after defining them
from vaultsync.config import Config, load_config

ConfigArg = Annotated[Path, typer.Argument(help="The volume's TOML config file.")]
targets_app = typer.Typer(help="The volume's replica set: add, remove, list targets.")


def _passphrase(cfg: Config) -> str | None:
    return cfg.passphrase() if cfg.volume.encryption else None


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
                passphrase=_passphrase(cfg),
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
        print(json.dumps({**asdict(report), "ok": report.ok, "adopted": adopted}, indent=2))
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


@targets_app.command("list")
def targets_list(
    config: ConfigArg,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every target: where it is, its mode, and whether it holds the volume yet."""
    from vaultsync.commands.targets_admin import list_targets

    rows = asyncio.run(list_targets(load_config(config)))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "endpoint", "bucket", "prefix", "mode", "seeded", "segments", "note")
    for r in rows:
        note = r["error"] or ("holds another volume" if r["header"] == "foreign" else "")
        table.add_row(
            r["name"],
            r["endpoint"],
            r["bucket"],
            r["prefix"],
            r["mode"],
            "yes" if r["seeded"] else "no",
            str(r["segments"]),
            note,
        )
    out.print(table)


@targets_app.command("add")
def targets_add(
    config: ConfigArg,
    name: Annotated[str, typer.Argument(help="The new target's name.")],
    endpoint: Annotated[str, typer.Option(help="S3 endpoint URL.")],
    bucket: Annotated[str, typer.Option(help="Bucket name (it must exist).")],
    prefix: Annotated[str, typer.Option(help="Key prefix inside the bucket.")] = "",
    region: Annotated[str, typer.Option()] = "us-east-1",
    mode: Annotated[str, typer.Option(help="sync or async.")] = "async",
    on_failure: Annotated[str | None, typer.Option(help="block or degrade (sync).")] = None,
    access_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the access key id.")
    ] = None,
    secret_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the secret key.")
    ] = None,
    credentials_file: Annotated[
        Path | None, typer.Option(help="File with access_key_id / secret_access_key lines.")
    ] = None,
    reload: Annotated[
        bool, typer.Option(help="Tell a running mount to start shipping to it now.")
    ] = True,
) -> None:
    """Add a target to the config (appended; comments kept) and to a running mount."""
    from vaultsync.commands.targets_admin import add_block, reload_daemon, write_config
    from vaultsync.errors import ConfigError

    cfg = load_config(config)
    if any(t.name == name for t in cfg.targets):
        raise ConfigError(f"the config already has a target named {name!r}; pick another name")
    creds: dict[str, str] = {}
    if credentials_file is not None:
        creds["file"] = str(credentials_file.expanduser().resolve())
    if access_key_env or secret_key_env:
        creds["access_key_id_env"] = access_key_env or ""
        creds["secret_access_key_env"] = secret_key_env or ""
    if not creds:
        raise ConfigError(
            "give the new target's credentials: --credentials-file PATH, or "
            "--access-key-env VAR --secret-key-env VAR"
        )
    fields: dict[str, Any] = {"name": name, "endpoint": endpoint, "bucket": bucket}
    if prefix:
        fields["prefix"] = prefix
    if region != "us-east-1":
        fields["region"] = region
    fields["mode"] = mode
    if on_failure:
        fields["on_failure"] = on_failure
    fields["credentials"] = creds
    new_cfg = write_config(config, add_block(config.read_text(), fields))
    t = new_cfg.target(name)
    out.print(f"target {name} ({t.endpoint}/{t.bucket}/{t.prefix}) added to {config}")
    if reload:
        out.print(reload_daemon(new_cfg, {name}, set()))


@targets_app.command("remove")
def targets_remove(
    config: ConfigArg,
    name: Annotated[str, typer.Argument(help="The target to drop from the replica set.")],
    force: Annotated[
        bool, typer.Option(help="Remove even if no other target holds everything it does.")
    ] = False,
    reload: Annotated[bool, typer.Option(help="Tell a running mount to stop shipping.")] = True,
) -> None:
    """Remove a target from the config and from a running mount (its bucket is not touched)."""
    from vaultsync.commands.targets_admin import (
        check_removable,
        reload_daemon,
        remove_block,
        write_config,
    )

    cfg = load_config(config)
    cfg.target(name)
    if force:
        if len(cfg.targets) == 1:
            err.print("warning: the volume is left with no target at all")
    else:
        covered_by = asyncio.run(check_removable(cfg, name))
        out.print(f"{covered_by} holds everything {name} holds")
    new_cfg = write_config(config, remove_block(config.read_text(), name))
    out.print(f"target {name} removed from {config}; its bucket was left as it is")
    if reload:
        out.print(reload_daemon(new_cfg, set(), {name}))
