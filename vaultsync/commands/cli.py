"""The `vaultsync` command line, assembled: each command lives in a module of its own.

The commands are registered in the order `--help` lists them. Each module
imports what its command needs inside the command, so that starting the
command line (and `--help`) pays only for typer and the config.
"""

from __future__ import annotations

import typer

from vaultsync.api.commands import serve, token_app
from vaultsync.commands import (
    demo,
    gc,
    init,
    migrate,
    mount,
    points,
    promote,
    restore,
    salvage,
    snapshot,
    status,
    systemd,
    targets,
    verify,
    version,
)
from vaultsync.commands.console import run_reporting_errors

app = typer.Typer(
    name="vaultsync",
    help="Replicated storage over S3-compatible object stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(init.init)
app.command()(status.status)
app.command()(verify.verify)
app.command()(gc.gc)
app.add_typer(snapshot.app, name="snapshot")
app.command()(points.points)
app.command()(restore.restore)
app.command()(promote.promote)
app.command()(salvage.salvage)
app.add_typer(systemd.app, name="systemd")
app.command()(demo.demo)
app.command()(mount.mount)
app.command()(mount.umount)
app.command()(migrate.migrate)
app.add_typer(targets.app, name="targets")
app.command()(version.version)
app.command()(serve)
app.add_typer(token_app, name="token")


def main() -> None:
    run_reporting_errors(app)
