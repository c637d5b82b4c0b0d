"""`vaultsync mount` and `vaultsync umount`: the command side of the mount daemon.

The daemon itself is vaultsync/daemon/: in the foreground it runs in this
process, with --daemon in a child process this one starts and waits for.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from vaultsync.commands.console import ConfigArg, out, passphrase
from vaultsync.config import load_config
from vaultsync.format.state_layout import StateDir

# Seconds `mount --from --daemon` waits for the rebuild and the mount (a large volume
# without a recent checkpoint replays many segments first).
POINT_MOUNT_TIMEOUT = 900.0


def _log_to_stderr() -> None:
    """The daemon logs to stderr: the terminal, or the log file start_daemon gave its child."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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
        _log_to_stderr()
        run_point_mount(cfg, from_target, at, mountpoint, passphrase(cfg), pid_file=pid_file)
        return
    if daemon:
        from vaultsync.daemon.process import start_daemon

        log_path = log_file or StateDir(cfg.volume.state_dir).log
        pid = start_daemon(config, mountpoint, log_path)
        out.print(f"volume {cfg.volume.name} mounted at {mountpoint} (pid {pid}, log {log_path})")
        return
    _log_to_stderr()
    if cfg.failover.mode == "auto":
        from vaultsync.daemon.site import run_site

        run_site(cfg, mountpoint, passphrase(cfg), config.resolve())
        return
    from vaultsync.daemon.writer import run_mount

    run_mount(cfg, mountpoint, passphrase(cfg), config.resolve())


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
