"""`vaultsync demo`, the embedded default: everything on one machine, for a first look.

Two independent S3 implementations (SeaweedFS and rclone's S3 server) stand
for two providers. Their keys are generated once and kept in 0600 files under
the demo directory, so a second run finds the same buckets and the same
volume; the keys are never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.text import Text

from vaultsync.commands.console import out, print_status
from vaultsync.config import load_config
from vaultsync.errors import VaultsyncError

if TYPE_CHECKING:
    from vaultsync.commands.local_servers import LocalProvider

BUCKET = "vaultsync-demo"


def _keys(cred_file: Path) -> tuple[str, str]:
    if cred_file.exists():
        values = dict(
            line.split(" = ", 1) for line in cred_file.read_text().splitlines() if " = " in line
        )
        return values["access_key_id"], values["secret_access_key"]
    ak, sk = "VS" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    cred_file.parent.mkdir(parents=True, exist_ok=True)
    cred_file.touch(mode=0o600)
    cred_file.write_text(f"access_key_id = {ak}\nsecret_access_key = {sk}\n")
    return ak, sk


def _write_config(directory: Path, providers: dict[str, LocalProvider]) -> Path:
    modes = {"seaweedfs": "sync", "rclone": "async"}
    parts = [
        "# Written by `vaultsync demo`; endpoints change on every run.\n",
        '[volume]\nname = "demo"\nstate_dir = "volume"\nchunk_size = "64KiB"\n',
    ]
    for name, p in providers.items():
        parts.append(
            f'\n[[targets]]\nname = "{name}"\nendpoint = "{p.endpoint}"\n'
            f'bucket = "{BUCKET}"\nprefix = "demo"\nmode = "{modes[name]}"\n'
            f'credentials = {{ file = "credentials/{name}.cred" }}\n'
        )
    # The mount daemon serves the REST API and restore page too; open, on loopback only.
    restores = (directory / "restores").resolve()
    restores.mkdir(parents=True, exist_ok=True)
    parts.append(
        f'\n[api]\nenabled = true\nlisten = "127.0.0.1:{_free_port()}"\n'
        f'open_on_loopback = true\nrestore_roots = ["{restores}"]\n'
    )
    path = directory / "vaultsync.toml"
    path.write_text("".join(parts))
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _short(p: Path) -> str:
    """A path as the user would type it from where they started the demo."""
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def next_steps(config_path: Path, mountpoint: Path, api_url: str | None = None) -> str:
    """What to try next, printed once the demo volume is mounted (`$ ` lines are commands)."""
    exe = Path(sys.executable).parent / "vaultsync"
    vs = _short(exe) if exe.exists() else "vaultsync"
    d = config_path.parent
    cfg, mnt = _short(config_path), _short(mountpoint)
    docs = Path(__file__).resolve().parents[2] / "docs"  # vaultsync/commands/ -> the repository
    lines = [
        "",
        f"config: {cfg} (keys in {_short(d / 'credentials')}, never printed)",
        "what to try next, from another shell:",
        f"  $ echo hello > {mnt}/hello.txt && ls -l {mnt}",
        f"  $ {vs} status {cfg}   # each target's health, watermark and lag",
        f"  $ {vs} points {cfg}   # what each provider could recover",
        f"  $ {vs} snapshot create {cfg} first",
        f"  $ {vs} restore {cfg} /hello.txt {_short(d / 'hello-restored.txt')} --from rclone",
        f"  $ mkdir -p {_short(d / 'pit')} && {vs} mount {cfg} {_short(d / 'pit')} "
        "--from seaweedfs --at first   # read-only as of the snapshot; Ctrl-C unmounts",
    ]
    if api_url is not None:
        lines.append(f"  REST API and restore page: {api_url}")
    lines += [
        f"disaster recovery, step by step: {_short(docs / 'runbook.md')}",
        f"deploying it for real: {_short(docs / 'operator-guide.md')}",
    ]
    return "\n".join(lines)


def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo keeps its providers and volume.")
    ] = Path(".vaultsync-demo"),
    once: Annotated[
        bool, typer.Option("--once", help="Set everything up, print status, stop.")
    ] = False,
) -> None:
    """Start two local S3 providers, create a volume replicated to both, keep them up."""
    run_demo(directory.resolve(), once=once, console=out)


def run_demo(directory: Path, *, once: bool, console: Console) -> None:
    """Everything up (providers, volume, mount), then kept up until Ctrl-C or SIGTERM.

    Whatever was started is stopped again on the way out, also after a failure.
    """
    # Imported here, as in every command: the command line starts without botocore.
    from vaultsync.commands.local_servers import start_rclone, start_seaweedfs
    from vaultsync.control.status import gather_status
    from vaultsync.daemon.process import start_daemon, unmount
    from vaultsync.fuse.mount import clean_stale_mount
    from vaultsync.store.targets import init_volume

    directory.mkdir(parents=True, exist_ok=True)
    providers: dict[str, LocalProvider] = {}
    stop = threading.Event()
    mounted = False
    mountpoint = directory / "mnt"

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        for name, start in (("seaweedfs", start_seaweedfs), ("rclone", start_rclone)):
            ak, sk = _keys(directory / "credentials" / f"{name}.cred")
            console.print(Text.assemble("starting local provider ", (name, "bold"), " …"))
            p = start(directory / "providers" / name, access_key=ak, secret_key=sk)
            providers[name] = p
            p.create_bucket(BUCKET)
            console.print(f"  {name} serves S3 at {p.endpoint} (pid {p.pid})")
        config_path = _write_config(directory, providers)
        cfg = load_config(config_path)
        report = asyncio.run(init_volume(cfg, None))
        verb = "created" if report.created_locally else "reopened"
        console.print(
            Text.assemble("volume ", (report.header.name, "bold")),
            f"{report.header.volume_id_hex} {verb}; "
            + ", ".join(f"{k}: header {v}" for k, v in report.targets.items()),
        )
        mountpoint = directory / "mnt"
        mountpoint.mkdir(exist_ok=True)
        clean_stale_mount(mountpoint)
        pid = start_daemon(config_path, mountpoint, directory / "mount.log")
        mounted = True
        console.print(
            Text.assemble("volume mounted at ", (str(mountpoint), "bold"), f" (daemon pid {pid})")
        )
        hello = mountpoint / "README.txt"
        if not hello.exists():
            hello.write_text("Files written here are journaled and shipped to both providers.\n")
        api_url = f"http://{cfg.api.listen}/ui/"
        print_status(asyncio.run(gather_status(cfg)))
        console.print(next_steps(config_path, mountpoint, api_url), highlight=False, soft_wrap=True)
        if once:
            return
        old = signal.signal(signal.SIGINT, on_signal), signal.signal(signal.SIGTERM, on_signal)
        console.print("\nmounted and providers running; press Ctrl-C to unmount and stop")
        try:
            while not stop.wait(1.0):
                for name, p in providers.items():
                    if not p.alive():
                        console.print(f"provider {name} exited; see {p.log_file}", style="red")
                        stop.set()
        finally:
            signal.signal(signal.SIGINT, old[0])
            signal.signal(signal.SIGTERM, old[1])
    finally:
        if mounted:
            console.print(f"unmounting {mountpoint}")
            try:
                unmount(mountpoint)
            except VaultsyncError as e:
                console.print(str(e), style="red")
        for name, p in providers.items():
            console.print(f"stopping {name} (pid {p.pid})")
            with contextlib.suppress(Exception):
                p.stop()
