"""`vaultsync targets add|remove|list`: change a live volume's replica set.

The config file is the one source of truth for targets, so these commands
edit it (appending or cutting one `[[targets]]` block, so the operator's
comments and layout survive), validate the result before it replaces the
file, then ask a running mount daemon to reload (SIGHUP) and wait until its
replication status shows the change.

Removing a target must not lose history: it is refused unless at least one
remaining target holds every segment and snapshot the removed one holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaultsync.config import Config, TargetConfig, load_config
from vaultsync.control.status import live_replication
from vaultsync.daemon.process import signal_reload
from vaultsync.errors import ConfigError, VaultsyncError
from vaultsync.format.bucket_layout import SEGMENTS, parse_segment_key
from vaultsync.format.state_layout import StateDir
from vaultsync.store.objectstore import ObjectStore, StoreError
from vaultsync.store.targets import read_remote_header

_BLOCK_RE = re.compile(r"^\s*\[\[\s*targets\s*\]\]\s*(#.*)?$")
_TABLE_RE = re.compile(r"^\s*\[")
_NAME_LINE_RE = re.compile(r"""^\s*name\s*=\s*(["'])(?P<name>[^"']*)\1\s*(#.*)?$""")


class TargetsError(VaultsyncError):
    pass


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def render_block(fields: dict[str, Any]) -> str:
    """One `[[targets]]` block, keys in the order given."""
    lines = ["[[targets]]"] + [f"{k} = {_toml_value(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def add_block(text: str, fields: dict[str, Any]) -> str:
    """The config text with a new target block appended (everything else untouched)."""
    sep = "" if text.endswith("\n\n") or not text else ("\n" if text.endswith("\n") else "\n\n")
    return f"{text}{sep}{render_block(fields)}"


def remove_block(text: str, name: str) -> str:
    """The config text without the `[[targets]]` block named `name`.

    A block runs from its header to the next table header; blank and comment
    lines just before the next header stay with what follows them.
    """
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if _BLOCK_RE.match(ln)]
    for s in starts:
        end = next((j for j in range(s + 1, len(lines)) if _TABLE_RE.match(lines[j])), len(lines))
        names = [m.group("name") for ln in lines[s:end] if (m := _NAME_LINE_RE.match(ln))]
        if names[:1] == [name]:
            while end > s + 1 and (
                not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")
            ):
                end -= 1  # blank lines and a comment introducing the next table stay
            return "".join(lines[:s] + lines[end:])
    raise TargetsError(
        f"no [[targets]] block with name = {name!r} found in the config text; edit the file by hand"
    )


def write_config(path: Path, text: str) -> Config:
    """Validate `text` as the config at `path`, then replace the file atomically."""
    fd, tmp = tempfile.mkstemp(prefix=".vaultsync-", suffix=".toml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        cfg = load_config(tmp)  # relative paths anchor to the same directory
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return cfg


def wait_for_daemon(state_dir: Path, present: set[str], absent: set[str], timeout: float) -> bool:
    """Until the daemon's replication status lists `present` and not `absent` targets."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = live_replication(state_dir)
        if snap is not None:
            have = set(snap.get("targets", {}))
            if present <= have and not (absent & have):
                return True
        time.sleep(0.1)
    return False


def reload_daemon(cfg: Config, present: set[str], absent: set[str]) -> str:
    """SIGHUP the volume's mount daemon, if one runs; a sentence saying what happened."""
    pid = signal_reload(cfg.volume.state_dir)
    if pid is None:
        return "no mount is running; the change applies at the next mount"
    if wait_for_daemon(cfg.volume.state_dir, present, absent, timeout=15):
        return f"the running mount (pid {pid}) reloaded its targets"
    raise TargetsError(
        f"the running mount (pid {pid}) did not take the change within 15 s; see its log "
        f"({StateDir(cfg.volume.state_dir).log}) and send it SIGHUP again (kill -HUP {pid})"
    )


# -- what a target holds ------------------------------------------------------------


@dataclass
class Holding:
    name: str
    reachable: bool
    error: str = ""
    header: str = "absent"  # absent | ours | foreign
    segments: frozenset[int] = frozenset()
    snapshots: frozenset[str] = frozenset()


async def holding(t: TargetConfig, volume_id: bytes | None) -> Holding:
    try:
        async with ObjectStore(t, max_attempts=2, connect_timeout=3) as st:
            h = await read_remote_header(st)
            segs = frozenset(
                [n async for o in st.list(SEGMENTS) if (n := parse_segment_key(o.key)) is not None]
            )
            snaps = frozenset([o.key async for o in st.list("snapshots/")])
    except (StoreError, ConfigError) as e:
        return Holding(t.name, False, e.reason if isinstance(e, StoreError) else str(e))
    except VaultsyncError as e:
        return Holding(t.name, True, str(e), header="foreign")
    state = "absent"
    if h is not None:
        state = "ours" if volume_id is None or h.volume_id == volume_id else "foreign"
    return Holding(t.name, True, "", state, segs, snaps)


def _local_volume_id(cfg: Config) -> bytes | None:
    from vaultsync.engine.volume import has_volume, read_local_header

    sd = cfg.volume.state_dir
    return read_local_header(sd).volume_id if has_volume(sd) else None


async def list_targets(cfg: Config) -> list[dict[str, Any]]:
    vid = _local_volume_id(cfg)
    held = await asyncio.gather(*(holding(t, vid) for t in cfg.targets))
    out = []
    for t, h in zip(cfg.targets, held, strict=True):
        seeded = h.header == "ours" and bool(h.segments)
        out.append(
            {
                "name": t.name,
                "endpoint": t.endpoint,
                "bucket": t.bucket,
                "prefix": t.prefix,
                "mode": t.mode,
                "seeded": seeded,
                "segments": len(h.segments),
                "last_segment": max(h.segments, default=0),
                "header": h.header,
                "error": h.error,
            }
        )
    return out


async def check_removable(cfg: Config, name: str) -> str:
    """Raise unless removing `name` loses nothing; else which remaining target covers it."""
    cfg.target(name)
    rest = [t for t in cfg.targets if t.name != name]
    if not rest:
        raise TargetsError(
            f"{name!r} is the volume's only target; add another one and migrate to it first "
            "(vaultsync targets add, vaultsync migrate), or use --force"
        )
    vid = _local_volume_id(cfg)
    gone, *others = await asyncio.gather(
        holding(cfg.target(name), vid), *(holding(t, vid) for t in rest)
    )
    if not gone.reachable:
        raise TargetsError(
            f"cannot tell what target {name!r} holds ({gone.error}); use --force to remove it "
            "anyway"
        )
    for h in others:
        if h.reachable and h.segments >= gone.segments and h.snapshots >= gone.snapshots:
            return h.name
    lacks = []
    for h in others:
        if not h.reachable:
            lacks.append(f"{h.name}: unreachable ({h.error})")
        else:
            miss = sorted(gone.segments - h.segments)
            lacks.append(
                f"{h.name}: lacks {len(miss)} segment(s)"
                + (f" from {miss[0]}" if miss else "")
                + (f" and {len(gone.snapshots - h.snapshots)} snapshot(s)")
            )
    raise TargetsError(
        f"no remaining target holds everything {name!r} holds ({'; '.join(lacks)}); "
        f"run vaultsync migrate CONFIG --from {name} --to {rest[0].name} first, or use --force"
    )
