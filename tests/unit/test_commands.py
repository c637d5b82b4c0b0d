"""The command line as assembled in commands/cli.py, run as an operator runs it.

The commands themselves are tested where they need servers or mounts
(servers/test_cli.py and the others in tests/README.md); this checks the
assembly and the console: every command is there in its place, and a failure
reaches the user as one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vaultsync import __version__

COMMANDS = [
    "init", "status", "verify", "gc", "points", "restore", "promote", "salvage", "demo",
    "mount", "umount", "migrate", "version", "serve",
    "snapshot", "systemd", "targets", "token",
]  # fmt: skip


def vaultsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vaultsync", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},  # one table row per command
    )


def test_help_lists_every_command_in_order() -> None:
    res = vaultsync("--help")
    assert res.returncode == 0, res.stderr
    listed = [
        line.strip("│ ").split()[0]
        for line in res.stdout.split("Commands")[1].splitlines()
        if line.startswith("│ ")
    ]
    assert listed == COMMANDS


def test_version_prints_the_version() -> None:
    res = vaultsync("version")
    assert (res.returncode, res.stdout) == (0, f"{__version__}\n")


def test_an_error_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    res = vaultsync("status", str(tmp_path / "nope.toml"))
    assert res.returncode == 1
    assert res.stderr == f"error: config file {tmp_path / 'nope.toml'} does not exist\n"
    assert res.stdout == ""
