"""`vaultsync targets list|add|remove`: the replica set, in the config and the running mount.

The config editing, the holdings check and the reload are targets_admin.py's;
these are the commands over them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vaultsync.commands.console import ConfigArg, JsonOption, err, out, print_json
from vaultsync.config import load_config

app = typer.Typer(help="The volume's replica set: add, remove, list targets.")


@app.command("list")
def targets_list(
    config: ConfigArg,
    as_json: JsonOption = False,
) -> None:
    """Every target: where it is, its mode, and whether it holds the volume yet."""
    from vaultsync.commands.targets_admin import list_targets

    rows = asyncio.run(list_targets(load_config(config)))
    if as_json:
        print_json(rows)
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


@app.command("add")
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


@app.command("remove")
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
