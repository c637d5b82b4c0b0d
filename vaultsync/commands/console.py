"""What every command shares: where it prints, the arguments spelled alike, how it fails.

A `VaultsyncError` reaches the user as one line on stderr and exit code 1:
what is wrong and what to do, never a traceback. Anything else escaping is a
bug and keeps its traceback, so it gets reported. `--json` prints the same
facts as the tables, as JSON on stdout and nothing else there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vaultsync.config import Config
from vaultsync.errors import OUT_OF_SPACE, VaultsyncError

# No markup: names, paths and messages are printed as they are (a path like /x/[old] or
# a key like [api].listen stays whole), and never broken across lines.
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)

ConfigArg = Annotated[Path, typer.Argument(help="The volume's TOML config file.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def print_json(data: Any) -> None:
    """Plain print, not the console: JSON for a pipe is never wrapped or highlighted."""
    print(json.dumps(data, indent=2))


def passphrase(cfg: Config) -> str | None:
    """None for a volume without encryption, whose config need not say where a passphrase is."""
    return cfg.passphrase() if cfg.volume.encryption else None


def when(ns: int | None) -> str:
    """A time in nanoseconds as the tables show it: UTC, to the microsecond."""
    if not ns:
        return "-"
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def print_status(st: dict[str, Any]) -> None:
    """`vaultsync status` as a table; the demo prints it too once it has mounted."""
    v = st["volume"]
    if not v.get("initialized"):
        out.print(
            Text.assemble("volume ", (v["name"], "bold"), f": not initialized in {v['state_dir']}")
        )
    else:
        enc = "encrypted" if v["encrypted"] else "not encrypted"
        out.print(
            Text.assemble("volume ", (v["name"], "bold")),
            f"{v['volume_id']}  format v{v['format_version']}, {enc}\n"
            f"  state {v['state_dir']}  last LSN {v['last_lsn']}  "
            f"{v['inodes']} inodes  {v['chunks']} chunks  "
            f"{v['sealed_segments']} sealed segments  journal {v['journal_bytes']} bytes",
        )
    if v.get("initialized"):
        out.print("  mounted: " + ("yes (live numbers)" if v.get("mounted") else "no"))
    if v.get("fenced"):
        f = v["fenced"]
        out.print(
            Text.assemble("  ", ("FENCED", "bold red")),
            f"target {f['target']} holds writer lease epoch "
            f"{f['lease_epoch']}, this site has epoch {v['epoch']}: another site writes this "
            "volume. Do not mount here; list unshipped changes with `vaultsync salvage`.",
        )
    fo = v.get("failover") or {}
    if fo.get("mode") == "auto" or fo.get("live"):
        _print_failover(fo)
    table = Table("target", "mode", "health", "watermark", "lag LSNs", "lag", "last error", "where")
    for t in st["targets"]:
        mode = t["mode"]
        if t.get("effective_mode") != mode:
            mode = f"{mode} → {t['effective_mode']}"
        lag = ""
        if t.get("lag_bytes") is not None:
            lag = f"{t['lag_bytes'] / 1e6:.1f} MB, {t['lag_seconds']:.1f}s"
        health = t["health"] + (f" ({t['reason']})" if t.get("reason") else "")
        table.add_row(
            t["name"],
            mode,
            health,
            str(t["watermark_lsn"]),
            str(t["lag_lsn"]),
            lag,
            t.get("last_error") or "",
            f"{t['endpoint']}/{t['bucket']}/{t['prefix']}",
        )
    out.print(table)


def _print_failover(fo: dict[str, Any]) -> None:
    """The site's role in automatic failover, as `status` shows it."""
    role = fo.get("role") or "none"
    style = {"writer": "bold green", "standby": "bold", "fenced": "bold red"}.get(role, "bold")
    line = Text.assemble(
        "  site ",
        (str(fo.get("site")), "bold"),
        ": ",
        (role.upper(), style),
        f"  epoch {fo.get('epoch', '?')}",
    )
    if fo.get("writer_site"):
        line.append(f"  writer {fo['writer_site']}")
    if role == "writer" and "acknowledging" in fo:
        line.append("  acknowledging" if fo["acknowledging"] else "  PAUSED (no majority)")
    out.print(line)
    if fo.get("reason"):
        out.print(f"    {fo['reason']}")
    hb = fo.get("heartbeat") or {}
    if hb:
        parts = []
        for name, h in hb.items():
            if "quiet_for" in h:
                parts.append(f"{name}: unchanged {h['quiet_for']:.1f}s")
            elif h.get("renewed_ago") is not None:
                parts.append(f"{name}: renewed {h['renewed_ago']:.1f}s ago")
            else:
                parts.append(f"{name}: {h.get('error') or 'not renewed'}")
        out.print("    heartbeat " + "; ".join(parts))
    sb = fo.get("standby")
    if sb:
        out.print(f"    copy at LSN {sb['lsn']} (segment {sb['segment']}) from {sb['source']}")
    if fo.get("takeover"):
        t = fo["takeover"]
        out.print(
            f"    took over from {t['from_site']} at epoch {t['epoch']} in {t['seconds']}s, "
            f"{t['downloaded_bytes']} bytes downloaded"
        )


def run_reporting_errors(app: Callable[[], Any]) -> None:
    """Run the command line; what the user can act on ends it with one line and exit 1."""
    try:
        app()
    except VaultsyncError as e:
        err.print(Text.assemble(("error:", "bold red"), f" {e}"), highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except OSError as e:
        if e.errno not in OUT_OF_SPACE:
            raise
        where = f" at {e.filename}" if e.filename else ""
        err.print(
            Text.assemble(
                ("error:", "bold red"),
                f" no space left on the disk{where} ({e.strerror}). Free some space there "
                "and try again; what was fsynced before is safe",
            ),
            highlight=False,
        )
        sys.exit(1)
