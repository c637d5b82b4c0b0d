"""Several sites of one volume on this machine, for failover drills.

Each site has its own state directory, mountpoint and config, and reaches each
target through a fault proxy of its own, so that one site can be cut off from
a target (or from all of them) while the others still reach it: a partition,
not an outage. The targets are buckets of one real S3 server; which of them
hold data and which only vote is the test's choice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.faultproxy import FaultProxy
from tests.support.mounting import cli, start_mount
from tests.support.targets import credentials_file
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.fuse.mount import lazy_unmount, mounted_at


@dataclass(frozen=True)
class TargetSpec:
    name: str
    bucket: str
    mode: str = "async"  # "sync" or "async"; a witness is always async
    role: str = "data"  # "data" or "witness"
    on_failure: str = "degrade"


@dataclass
class Site:
    name: str
    root: Path
    proxies: dict[str, FaultProxy]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    stopped: bool = False  # SIGSTOPped

    @property
    def config(self) -> Path:
        return self.root / "vs.toml"

    @property
    def mountpoint(self) -> Path:
        return self.root / "mnt"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "mount.log"

    def start(self, timeout: float = 60) -> None:
        """Start the mount daemon; returns once the mountpoint answers (either role)."""
        self.proc = start_mount(self.config, self.mountpoint, self.log, timeout)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def status(self, probe: bool = False) -> dict[str, Any]:
        """`vaultsync status --json` here; without `probe` it asks no target (a site cut
        off from them would wait for each), which the daemon's own account makes enough."""
        res = cli("status", "--json", *([] if probe else ["--no-probe"]), str(self.config))
        assert res.returncode == 0, res.stderr
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    def role(self) -> str | None:
        failover = self.status()["volume"].get("failover") or {}
        role: str | None = failover.get("role")
        return role

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        """Seconds until `check()` held; AssertionError with the site's log after `timeout`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if check():
                return time.monotonic() - t0
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: not {what} after {timeout:.0f}s:\n{self.tail()}")

    def wait_role(self, role: str, timeout: float = 60) -> float:
        return self.wait_for(f"role {role}", lambda: self.role() == role, timeout)

    def cut(self, *targets: str) -> None:
        """Partition this site from the targets named (all of them if none): requests are
        held, not refused, as a partition holds them."""
        for name in targets or tuple(self.proxies):
            self.proxies[name].blackhole()

    def heal(self) -> None:
        for p in self.proxies.values():
            p.passthrough()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None
        lazy_unmount(self.mountpoint)

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.stopped = True

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.stopped = False

    def umount(self, timeout: float = 120) -> None:
        res = cli("umount", str(self.mountpoint), timeout=timeout)
        assert res.returncode == 0, res.stderr
        if self.proc is not None:
            self.proc.wait(30)
            self.proc = None

    def cleanup(self) -> None:
        """Never leave a process, a frozen process or a mount behind."""
        if self.proc is not None and self.proc.poll() is None:
            if self.stopped:
                self.thaw()
            self.heal()
            try:
                self.umount(timeout=60)
            except Exception:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None
        if mounted_at(self.mountpoint) is not None:
            lazy_unmount(self.mountpoint)


def site_config(
    site: Site,
    provider: LocalProvider,
    targets: list[TargetSpec],
    *,
    failover_after: float,
    extra: str = "",
    failover_extra: str = "",
) -> str:
    """The TOML of one site: the same volume and targets as every other site, reached
    through this site's own proxies."""
    cred = credentials_file(provider.access_key, provider.secret_key)
    out = (
        f'[volume]\nname = "fo"\nstate_dir = "state"\nsegment_max_age = 0.5\n\n'
        f'[site]\nname = "{site.name}"\n\n'
        f'[failover]\nmode = "auto"\nfailover_after = {failover_after}\n{failover_extra}\n'
        f"[replication]\nprobe_interval = 0.5\n{extra}"
    )
    for t in targets:
        out += (
            f'\n[[targets]]\nname = "{t.name}"\nendpoint = "{site.proxies[t.name].endpoint}"\n'
            f'bucket = "{t.bucket}"\nprefix = "v"\nmode = "{t.mode}"\nrole = "{t.role}"\n'
            f'on_failure = "{t.on_failure}"\ncredentials = {{ file = "{cred}" }}\n'
        )
    return out


@contextmanager
def sites(
    tmp: Path,
    provider: LocalProvider,
    names: list[str],
    targets: list[TargetSpec],
    *,
    failover_after: float = 6.0,
    extra: str = "",
    failover_extra: str = "",
) -> Iterator[dict[str, Site]]:
    """Sites sharing `targets` (buckets created here), each behind its own proxies; the
    first one runs `init`. Every process, proxy and mount is gone afterwards."""
    for t in targets:
        provider.create_bucket(t.bucket)
    made: dict[str, Site] = {}
    try:
        for name in names:
            root = tmp / name
            (root / "mnt").mkdir(parents=True)
            proxies = {t.name: FaultProxy.for_url(provider.endpoint) for t in targets}
            site = made[name] = Site(name, root, proxies)
            site.config.write_text(
                site_config(
                    site,
                    provider,
                    targets,
                    failover_after=failover_after,
                    extra=extra,
                    failover_extra=failover_extra.replace("SITE_ROOT", str(root)),
                )
            )
        first = made[names[0]]
        res = cli("init", str(first.config), timeout=60)
        assert res.returncode == 0, res.stderr
        yield made
    finally:
        for site in made.values():
            site.cleanup()
        for site in made.values():
            for p in site.proxies.values():
                p.stop()
