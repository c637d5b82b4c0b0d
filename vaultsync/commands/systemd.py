"""`vaultsync systemd install`: the unit templates, with this installation's path filled in.

The units live in `vaultsync/units/` as templates (`vaultsync-mount@.service`,
`vaultsync-serve@.service`); `@VAULTSYNC@` stands for the `vaultsync`
executable, which is the one beside the running interpreter (the virtual
environment's) unless told otherwise. `systemctl daemon-reload` runs only
when installing into the live system and systemd is the running init.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from vaultsync.commands.console import out
from vaultsync.errors import VaultsyncError

UNIT_DIR = Path("etc/systemd/system")
UNITS = ("vaultsync-mount@.service", "vaultsync-serve@.service")
PLACEHOLDER = "@VAULTSYNC@"


class SystemdError(VaultsyncError):
    pass


@dataclass
class InstallReport:
    unit_dir: Path
    executable: str
    written: list[Path] = field(default_factory=list)
    reloaded: bool = False
    reload_note: str = ""


def unit_text(name: str, executable: str) -> str:
    """The unit `name` with the executable's absolute path filled in."""
    template = (resources.files("vaultsync") / "units" / name).read_text()
    return template.replace(PLACEHOLDER, executable)


def default_executable() -> str:
    here = Path(sys.executable).parent / "vaultsync"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("vaultsync")
    if found is None:
        raise SystemdError("cannot find the vaultsync executable; give it with --bin PATH")
    return str(Path(found).resolve())


def systemd_running() -> bool:
    """True when systemd is the init system here (sd_booted()'s test)."""
    return Path("/run/systemd/system").is_dir()


def install(prefix: Path | None = None, executable: str | None = None) -> InstallReport:
    """Write the units under PREFIX/etc/systemd/system (PREFIX defaults to /)."""
    exe = executable or default_executable()
    if not os.path.isabs(exe):
        raise SystemdError(f"--bin must be an absolute path (got {exe!r})")
    root = Path("/") if prefix is None else prefix
    unit_dir = root / UNIT_DIR
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemdError(f"cannot create {unit_dir}: {e.strerror or e}") from None
    report = InstallReport(unit_dir, exe)
    for name in UNITS:
        dest = unit_dir / name
        tmp = dest.with_name(f".{name}.tmp")
        try:
            tmp.write_text(unit_text(name, exe))
            tmp.chmod(0o644)
            os.replace(tmp, dest)
        except OSError as e:
            raise SystemdError(f"cannot write {dest}: {e.strerror or e}") from None
        report.written.append(dest)
    if root.resolve() != Path("/"):
        report.reload_note = "installed under a prefix: systemctl daemon-reload not run"
    elif not systemd_running():
        report.reload_note = "systemd is not running here: systemctl daemon-reload not run"
    else:
        res = subprocess.run(
            ["systemctl", "daemon-reload"], capture_output=True, text=True, timeout=60
        )
        if res.returncode != 0:
            raise SystemdError(f"systemctl daemon-reload failed: {res.stderr.strip()}")
        report.reloaded = True
    return report


app = typer.Typer(help="systemd units for the mount daemon and the API.")


@app.command("install")
def systemd_install(
    prefix: Annotated[
        Path | None,
        typer.Option(help="Install under DIR instead of / (units go to DIR/etc/systemd/system)."),
    ] = None,
    bin_path: Annotated[
        str | None,
        typer.Option("--bin", help="The vaultsync executable the units run (default: this one)."),
    ] = None,
) -> None:
    """Write vaultsync-mount@.service and vaultsync-serve@.service; reload systemd if it runs."""
    r = install(prefix, bin_path)
    for p in r.written:
        out.print(f"wrote {p}")
    out.print(f"the units run {r.executable}")
    out.print("systemctl daemon-reload done" if r.reloaded else r.reload_note)
    out.print(
        "next: put the volume's config in /etc/vaultsync/NAME.toml, then "
        "systemctl enable --now vaultsync-mount@NAME.service"
    )
