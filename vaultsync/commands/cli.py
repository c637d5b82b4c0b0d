"""The `vaultsync` command line.

Every command turns a `VaultsyncError` into one line on stderr and exit code
1: the user sees what is wrong and what to do, never a traceback. Anything
else escaping is a bug and keeps its traceback, so it gets reported.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vaultsync import __version__
from vaultsync.config import Config, load_config
from vaultsync.errors import OUT_OF_SPACE, VaultsyncError
from vaultsync.format.state_layout import StateDir

app = typer.Typer(
    name="vaultsync",
    help="Replicated storage over S3-compatible object stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No markup: names, paths and messages are printed as they are (a path like /x/[old] or
# a key like [api].listen stays whole), and never broken across lines.
out = Console(soft_wrap=True, markup=False)
err = Console(stderr=True, soft_wrap=True, markup=False)

ConfigArg = Annotated[Path, typer.Argument(help="The volume's TOML config file.")]


def _passphrase(cfg: Config) -> str | None:
    return cfg.passphrase() if cfg.volume.encryption else None


@app.command()
def init(config: ConfigArg) -> None:
    """Create the volume locally and write its header to every target."""
    from vaultsync.store.targets import init_volume

    cfg = load_config(config)
    report = asyncio.run(init_volume(cfg, _passphrase(cfg)))
    h = report.header
    verb = "created" if report.created_locally else "already exists"
    out.print(
        Text.assemble(
            "volume ", (h.name, "bold"), f" ({h.volume_id_hex}) {verb} in {cfg.volume.state_dir}"
        )
    )
    for name, state in report.targets.items():
        out.print(f"  target {name}: header {state}")


@app.command()
def status(
    config: ConfigArg,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    probe: Annotated[bool, typer.Option(help="Contact each target.")] = True,
) -> None:
    """Show the volume and every target: mode, health, watermark, lag."""
    from vaultsync.control.status import gather_status

    cfg = load_config(config)
    st = asyncio.run(gather_status(cfg, probe=probe))
    if as_json:
        print(json.dumps(st, indent=2))
        return
    print_status(st)


def print_status(st: dict[str, Any]) -> None:
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


@app.command()
def verify(
    config: ConfigArg,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    sample: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of segments to check (1 = all).")
    ] = 1.0,
    heal: Annotated[bool, typer.Option(help="Re-upload missing or damaged copies.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
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

        print(json.dumps({**asdict(report), "clean": report.clean}, indent=2))
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


@app.command()
def gc(
    config: ConfigArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would go; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a mounted volume's daemon.")
    ] = 600.0,
) -> None:
    """Thin old points per [retention] and delete what no retained point needs."""
    from vaultsync.engine.state_lock import VolumeInUseError, read_pid, take_lock
    from vaultsync.engine.volume import has_volume
    from vaultsync.errors import VolumeError
    from vaultsync.replication.gc import gc_mounted, gc_unmounted

    cfg = load_config(config)
    state = cfg.volume.state_dir
    if not has_volume(state):
        raise VolumeError(f"{state} holds no volume; GC runs at the writer's site")
    try:
        lock = take_lock(state)
    except VolumeInUseError:
        pid = read_pid(state)
        if pid is None:
            raise
        if dry_run:
            raise VaultsyncError(
                "--dry-run needs the volume unmounted; a mounted volume's daemon runs GC "
                "itself (retention.gc_interval), or now with `vaultsync gc CONFIG`"
            ) from None
        with err.status("the mount daemon is collecting garbage"):
            result = gc_mounted(state, pid, timeout)
        if not result.get("ok"):
            raise VaultsyncError(f"GC failed: {result.get('error')}") from None
    else:
        try:
            with err.status("collecting garbage"):
                result = asyncio.run(gc_unmounted(cfg, _passphrase(cfg), dry_run)).to_json()
        finally:
            lock.close()
    if as_json:
        print(json.dumps(result, indent=2))
        return
    verb = "would delete" if result.get("dry_run") else "deleted"
    out.print(
        f"{verb} {len(result['segments_deleted'])} segment(s) "
        f"({result['bytes_deleted']} bytes) and {result['checkpoints_dropped']} checkpoint(s); "
        f"compacted {len(result['segments_compacted'])} segment(s) "
        f"({result['chunks_moved']} chunks moved); {result['chunks_dropped']} chunks dropped"
    )
    out.print(
        f"retained: {result['retained_points']} checkpoint point(s), replay ranges "
        + ", ".join(f"{r['from_lsn']}..{r['to_lsn'] or 'head'}" for r in result["retained_ranges"])
    )
    if result.get("waiting"):
        out.print(
            f"{len(result['waiting'])} compacted segment(s) go once every target "
            "holds the moved chunks"
        )


snapshot_app = typer.Typer(help="Named points in time, kept in the buckets until deleted.")
app.add_typer(snapshot_app, name="snapshot")


def _when(ns: int | None) -> str:
    if not ns:
        return "-"
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@snapshot_app.command("create")
def snapshot_create(
    config: ConfigArg,
    name: Annotated[str, typer.Argument(help="Letters, digits, '.', '_', '-'.")],
    lsn: Annotated[int | None, typer.Option(help="Default: the newest committed LSN.")] = None,
) -> None:
    """Name the volume's current point (or --lsn) at every target."""
    from vaultsync.points.snapshots import create_snapshot

    cfg = load_config(config)
    doc = asyncio.run(create_snapshot(cfg, name, lsn))
    out.print(f"snapshot {name} = LSN {doc['lsn']} at {len(cfg.targets)} target(s)")


@snapshot_app.command("list")
def snapshot_list(
    config: ConfigArg,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every snapshot the targets hold."""
    from vaultsync.points.snapshots import list_snapshots

    snaps = asyncio.run(list_snapshots(load_config(config)))
    if as_json:
        print(json.dumps(snaps, indent=2))
        return
    table = Table("name", "LSN", "created", "targets")
    for s in snaps:
        table.add_row(s["name"], str(s["lsn"]), _when(s["created_ns"]), ", ".join(s["targets"]))
    out.print(table)


@snapshot_app.command("delete")
def snapshot_delete(config: ConfigArg, name: str) -> None:
    """Delete a snapshot at every target (its point may then be thinned by retention)."""
    from vaultsync.points.snapshots import delete_snapshot

    where = asyncio.run(delete_snapshot(load_config(config), name))
    out.print(f"snapshot {name} deleted at {', '.join(where)}")


@app.command()
def points(
    config: ConfigArg,
    target: Annotated[str | None, typer.Option(help="Only this target.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """What each target can recover: LSN range and times (mount --from T --at X takes any)."""
    from vaultsync.points.snapshots import target_points
    from vaultsync.store.objectstore import ObjectStore, StoreError

    cfg = load_config(config)
    names = [target] if target else [t.name for t in cfg.targets]

    async def gather() -> list[dict[str, Any]]:
        res = []
        for n in names:
            try:
                async with ObjectStore(cfg.target(n), max_attempts=2) as st:
                    res.append(await target_points(st))
            except StoreError as e:
                res.append({"target": n, "error": str(e)})
        return res

    found = asyncio.run(gather())
    if as_json:
        print(json.dumps(found, indent=2))
        return
    table = Table("target", "segments", "LSNs", "from", "to", "note")
    for p in found:
        if "error" in p:
            table.add_row(p["target"], "-", "-", "-", "-", p["error"])
        elif p["last_lsn"] is None:
            table.add_row(p["target"], "0", "-", "-", "-", "nothing shipped yet")
        else:
            note = f"+ {p['open_tail_pieces']} tail piece(s)" if p["open_tail_pieces"] else ""
            table.add_row(
                p["target"],
                str(p["segments"]),
                f"{p['first_lsn']}..{p['last_lsn']}",
                _when(p["first_time_ns"]),
                _when(p["last_time_ns"]),
                note,
            )
    out.print(table)


@app.command()
def restore(
    config: ConfigArg,
    path: Annotated[str, typer.Argument(help="File or directory inside the volume, e.g. /home.")],
    dest: Annotated[Path, typer.Argument(help="Local directory or file name to restore to.")],
    from_target: Annotated[str, typer.Option("--from", help="The target to restore from.")],
    at: Annotated[
        str | None, typer.Option(help="An LSN, an ISO-8601 time, or a snapshot (default: newest).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite files that differ at DEST.")] = False,
    parallel: Annotated[int, typer.Option(min=1, max=64, help="Files copied at once.")] = 8,
    bwlimit: Annotated[
        str | None,
        typer.Option(help="At most this many bytes per second, e.g. 50M (default: no cap)."),
    ] = None,
) -> None:
    """Copy PATH as it was at a point out of a target into DEST (resumable)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from vaultsync.points.restore import restore as run_restore
    from vaultsync.store.ratelimit import parse_rate

    cfg = load_config(config)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("restoring", total=None)
        report = asyncio.run(
            run_restore(
                cfg,
                from_target,
                at,
                path,
                dest,
                _passphrase(cfg),
                force=force,
                parallel=parallel,
                bwlimit=parse_rate(bwlimit),
                progress=lambda n: bar.advance(task, n),
                total=lambda n: bar.update(task, total=n),
            )
        )
    out.print(
        f"restored {path} as of LSN {report.lsn} into {dest}: {report.files} files "
        f"({report.bytes / 1e6:.1f} MB), {report.dirs} directories, {report.symlinks} symlinks, "
        f"{report.links} hard links; {report.skipped} already there"
    )
    for e in report.errors:
        err.print(f"warning: {e}")


@app.command()
def promote(
    config: ConfigArg,
    from_target: Annotated[str, typer.Option("--from", help="The target to rebuild from.")],
    force: Annotated[
        bool, typer.Option(help="Move an existing local volume aside (kept for salvage).")
    ] = False,
) -> None:
    """Make this site the writer: take the lease (epoch + 1), rebuild from the target."""
    from vaultsync.control.promote import promote as run_promote

    cfg = load_config(config)
    r = asyncio.run(run_promote(cfg, from_target, _passphrase(cfg), force=force))
    out.print(
        f"promoted: this site now writes epoch {r.epoch} of {cfg.volume.name}, rebuilt from "
        f"{from_target} at LSN {r.lsn} ({r.segments} segments"
        + (f", open segment {r.sealed_tail} sealed here" if r.sealed_tail else "")
        + f"); lease taken at {', '.join(r.leased_at)}"
    )
    if r.moved_aside:
        out.print(f"the previous local volume was moved to {r.moved_aside}")
    out.print(f"mount it with: vaultsync mount {config} MOUNTPOINT")


@app.command()
def salvage(
    config: ConfigArg,
    dest: Annotated[
        Path | None,
        typer.Option("--out", help="Copy the salvaged files here (default: only list them)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """After a promotion elsewhere: the files this site changed that no target received."""
    from vaultsync.control.salvage import salvage as run_salvage

    cfg = load_config(config)
    r = asyncio.run(run_salvage(cfg, _passphrase(cfg), dest))
    if as_json:
        print(json.dumps({**r.__dict__, "files": [list(f) for f in r.files]}, indent=2))
        return
    gone = f"; {r.gone} changed file(s) no longer exist here" if r.gone else ""
    out.print(
        f"transactions {r.shipped_lsn + 1}..{r.last_lsn} never reached a target as whole "
        f"segments: {len(r.files)} file(s){gone}"
    )
    for path, size in r.files:
        out.print(f"  {path}  ({size} bytes)")
    if dest is not None:
        out.print(f"copied {r.copied} file(s) into {dest}")


systemd_app = typer.Typer(help="systemd units for the mount daemon and the API.")
app.add_typer(systemd_app, name="systemd")


@systemd_app.command("install")
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
    from vaultsync.commands.systemd import install

    r = install(prefix, bin_path)
    for p in r.written:
        out.print(f"wrote {p}")
    out.print(f"the units run {r.executable}")
    out.print("systemctl daemon-reload done" if r.reloaded else r.reload_note)
    out.print(
        "next: put the volume's config in /etc/vaultsync/NAME.toml, then "
        "systemctl enable --now vaultsync-mount@NAME.service"
    )


@app.command()
def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo keeps its providers and volume.")
    ] = Path(".vaultsync-demo"),
    once: Annotated[
        bool, typer.Option("--once", help="Set everything up, print status, stop.")
    ] = False,
) -> None:
    """Start two local S3 providers, create a volume replicated to both, keep them up."""
    from vaultsync.commands.demo import run_demo

    run_demo(directory.resolve(), once=once, console=out)


@app.command()
def mount(
    config: ConfigArg,
    mountpoint: Annotated[Path, typer.Argument(help="An existing empty directory.")],
    daemon: Annotated[
        bool, typer.Option("--daemon", "-d", help="Run in the background; return once mounted.")
    ] = False,
    log_file: Annotated[
        Path | None, typer.Option(help="Daemon log (default: STATE_DIR/mount.log).")
    ] = None,
    from_target: Annotated[
        str | None,
        typer.Option(
            "--from", help="Mount read-only from this target alone (no local state needed)."
        ),
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(help="With --from: an LSN, an ISO-8601 time, or a snapshot name."),
    ] = None,
    pid_file: Annotated[
        Path | None,
        typer.Option(
            help="With --from: where the mount writes its PID (default with --daemon: "
            "a file in the temp directory named after the mount point)."
        ),
    ] = None,
) -> None:
    """Mount the volume; stays in the foreground until unmounted or signalled."""
    cfg = load_config(config)
    if at is not None and from_target is None:
        raise typer.BadParameter("--at needs --from TARGET")
    if pid_file is not None and from_target is None:
        raise typer.BadParameter("--pid-file is for --from (the writer's is STATE_DIR/mount.pid)")
    if from_target is not None:
        import logging

        from vaultsync.daemon.point import run_point_mount
        from vaultsync.daemon.process import point_runtime_file, start_daemon

        cfg.target(from_target)  # an unknown target is an error here, not in the daemon's log
        if daemon:
            log_path = log_file or point_runtime_file(mountpoint, "log")
            pid_path = pid_file or point_runtime_file(mountpoint, "pid")
            extra = ["--from", from_target, *(["--at", at] if at else [])]
            pid = start_daemon(
                config,
                mountpoint,
                log_path,
                timeout=POINT_MOUNT_TIMEOUT,
                extra_args=[*extra, "--pid-file", str(pid_path.resolve())],
            )
            out.print(
                f"{cfg.volume.name} as of {at or 'the newest point'} from {from_target} "
                f"mounted read-only at {mountpoint} (pid {pid}, pid file {pid_path}, "
                f"log {log_path})"
            )
            return
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        run_point_mount(cfg, from_target, at, mountpoint, _passphrase(cfg), pid_file=pid_file)
        return
    if daemon:
        from vaultsync.daemon.process import start_daemon

        log_path = log_file or StateDir(cfg.volume.state_dir).log
        pid = start_daemon(config, mountpoint, log_path)
        out.print(f"volume {cfg.volume.name} mounted at {mountpoint} (pid {pid}, log {log_path})")
        return
    import logging

    from vaultsync.daemon.writer import run_mount

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_mount(cfg, mountpoint, _passphrase(cfg), config.resolve())


# Seconds `mount --from --daemon` waits for the rebuild and the mount (a large volume
# without a recent checkpoint replays many segments first).
POINT_MOUNT_TIMEOUT = 900.0


@app.command()
def umount(
    mountpoint: Annotated[Path, typer.Argument(help="Where the volume is mounted.")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Unmount even when the daemon cannot save the changes it buffers (a full "
            "disk); changes no fsync saved are then lost.",
        ),
    ] = False,
) -> None:
    """Flush everything, unmount, and wait for the daemon to exit."""
    from vaultsync.daemon.process import unmount

    unmount(mountpoint, force=force)
    out.print(f"unmounted {mountpoint}")


from vaultsync.commands.migrate import migrate as _migrate  # noqa: E402
from vaultsync.commands.migrate import targets_app  # noqa: E402

app.command("migrate")(_migrate)
app.add_typer(targets_app, name="targets")


@app.command()
def version() -> None:
    """Print the vaultsync version."""
    out.print(__version__)


def _register_api() -> None:
    from vaultsync.api.commands import serve, token_app

    app.command()(serve)
    app.add_typer(token_app, name="token")


_register_api()


def main() -> None:
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
