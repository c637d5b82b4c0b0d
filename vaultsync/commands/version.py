"""`vaultsync version`."""

from __future__ import annotations

from vaultsync import __version__
from vaultsync.commands.console import out


def version() -> None:
    """Print the vaultsync version."""
    out.print(__version__)
