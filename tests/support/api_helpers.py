"""Shared by the API tests: a volume written in rounds, and real API servers on loopback.

The volume is written through a real mount (replicated to SeaweedFS, sync,
and rclone, async); after each round the test records the wall-clock point
and every file's bytes, which is what downloads and restores as of that
point must reproduce. Servers are real uvicorn processes (`vaultsync serve`)
or the mount daemon itself, stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.mounting import Mount, fsync_path
from tests.support.targets import sync_and_async_targets
from vaultsync.api.auth import hash_token
from vaultsync.commands.local_servers import LocalProvider, free_port

READ_TOKEN = "vst_read-" + uuid.uuid4().hex
ADMIN_TOKEN = "vst_admin-" + uuid.uuid4().hex


def api_toml(port: int, roots: list[Path], *, enabled: bool, open_loopback: bool = False) -> str:
    toml = (
        f'\n[api]\nenabled = {str(enabled).lower()}\nlisten = "127.0.0.1:{port}"\n'
        f"open_on_loopback = {str(open_loopback).lower()}\n"
        f"restore_roots = [{', '.join(repr(str(r)) for r in roots)}]\n"
        'from_target = "sw"\nmax_page = 50\n'
    )
    for name, tok, scope in (("r", READ_TOKEN, "read"), ("a", ADMIN_TOKEN, "admin")):
        toml += (
            f'\n[[api.tokens]]\nname = "{name}"\nscope = "{scope}"\nhash = "{hash_token(tok)}"\n'
        )
    return toml


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Round:
    at: str  # ISO time right after the round was durable everywhere
    files: dict[str, bytes]  # volume path -> content


@dataclass
class Volume:
    mount: Mount
    rounds: list[Round] = field(default_factory=list)
    odd: dict[bytes, bytes] = field(default_factory=dict)  # volume path -> content


# Names a volume may hold that text-minded clients trip on: a newline, a tab, bytes that
# are not UTF-8, and characters that mean something in a URL.
ODD_NAMES = (b"line\nbreak.txt", b"tab\there", b"caf\xe9.txt", b"100% sure?#.txt", b"\xff\xfe")


def _stamp() -> str:
    now = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}Z"


def write_volume(
    root: Path,
    sw: LocalProvider,
    rc: LocalProvider,
    api: str,
    big_mib: int = 24,
    odd_names: bool = False,
) -> Volume:
    """Mount a fresh volume (API config `api`), write two rounds, leave it mounted.

    With `odd_names`, round 0 also writes ODD_NAMES under /odd (in `Volume.odd`, not
    in the rounds: a client library cannot even spell most of them as a URL).
    """
    bucket = f"api-{uuid.uuid4().hex[:12]}"
    sw.create_bucket(bucket)
    rc.create_bucket(bucket)
    m = Mount.create(
        root,
        'segment_size = "4MiB"\nsegment_max_age = 0.3\n[replication]\ncheckpoint_every = 0\n'
        + sync_and_async_targets(sw, rc, bucket)
        + api,
    )
    m.start()
    vol = Volume(m)
    mnt = m.mountpoint
    files: dict[str, bytes] = {}

    def put(rel: str, data: bytes) -> None:
        p = mnt / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[rel] = data

    # Round 0: a big file, a small one, a directory to page through, a symlink.
    put("/big.bin", os.urandom(big_mib << 20))
    put("/docs/a.txt", b"first version\n" * 100)
    put("/docs/space name \u00e9.txt", b"unicode name")
    for i in range(30):
        put(f"/many/f{i:03d}", f"file {i}\n".encode() * (i + 1))
    os.symlink("docs", mnt / "link")
    if odd_names:
        odd_dir = os.fsencode(mnt / "odd")
        os.mkdir(odd_dir)
        for i, name in enumerate(ODD_NAMES):
            data = f"odd file {i}\n".encode()
            with open(odd_dir + b"/" + name, "wb") as out:
                out.write(data)
            vol.odd[b"/odd/" + name] = data
    fsync_path(mnt / "big.bin")
    time.sleep(0.4)
    vol.rounds.append(Round(_stamp(), dict(files)))
    time.sleep(0.05)
    # Round 1: the big file changed in the middle, a.txt rewritten, one file gone.
    big = bytearray(files["/big.bin"])
    big[5 << 20 : (5 << 20) + 100_000] = os.urandom(100_000)
    with open(mnt / "big.bin", "r+b") as f:
        f.seek(5 << 20)
        f.write(big[5 << 20 : (5 << 20) + 100_000])
    files["/big.bin"] = bytes(big)
    put("/docs/a.txt", b"second version\n")
    os.unlink(mnt / "many" / "f000")
    del files["/many/f000"]
    fsync_path(mnt / "big.bin")
    time.sleep(0.4)
    vol.rounds.append(Round(_stamp(), dict(files)))
    return vol


class ApiServer:
    """`vaultsync serve CONFIG --from TARGET` as a real process on a free loopback port."""

    def __init__(self, config: Path, target: str, log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vaultsync",
                    "serve",
                    str(config),
                    "--from",
                    target,
                    "--listen",
                    f"127.0.0.1:{self.port}",
                ],
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        wait_healthy(self.url, lambda: self.proc.poll() is None, log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def wait_healthy(url: str, alive: object, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise AssertionError("API server exited: " + log.read_text()[-2000:])
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("API server did not answer: " + log.read_text()[-2000:])
