"""Session-wide real S3 servers on loopback, and the helpers every test shares.

Each server is started once per session on free ports with its own keys, and
stopped by its PID at the end. Tests isolate themselves with fresh buckets.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.mounting import Mount
from vaultsync.config import TargetConfig
from vaultsync.providers import LocalProvider, start_rclone, start_seaweedfs


def _keys() -> tuple[str, str]:
    return "VS" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProvider]:
    ak, sk = _keys()
    p = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), access_key=ak, secret_key=sk)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="session")
def rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProvider]:
    ak, sk = _keys()
    p = start_rclone(tmp_path_factory.mktemp("rclone"), access_key=ak, secret_key=sk)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(params=["seaweedfs", "rclone"])
def provider(request: pytest.FixtureRequest) -> LocalProvider:
    """Run the test once against each server."""
    p: LocalProvider = request.getfixturevalue(request.param)
    return p


_CRED_DIR = Path(tempfile.mkdtemp(prefix="vs-creds-"))


def _credentials_file(access_key: str, secret_key: str) -> Path:
    path = _CRED_DIR / f"{uuid.uuid4().hex}.creds"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"access_key_id = {access_key}\nsecret_access_key = {secret_key}\n")
    return path


def target_for(
    p: LocalProvider,
    name: str = "t1",
    *,
    bucket: str | None = None,
    prefix: str = "vol/",
    mode: str = "async",
    secret: str | None = None,
) -> TargetConfig:
    """A target config on `p`, in a fresh bucket unless one is given."""
    if bucket is None:
        bucket = f"t-{uuid.uuid4().hex[:16]}"
        p.create_bucket(bucket)
    return TargetConfig.model_validate(
        {
            "name": name,
            "endpoint": p.endpoint,
            "bucket": bucket,
            "prefix": prefix,
            "mode": mode,
            "credentials": {"file": str(_credentials_file(p.access_key, secret or p.secret_key))},
        }
    )


def target_block(
    name: str,
    p: LocalProvider,
    bucket: str,
    mode: str = "async",
    *,
    endpoint: str | None = None,
    prefix: str = "v",
    **options: str,
) -> str:
    """A [[targets]] table for a volume's TOML: `bucket` on `p` (reached at `endpoint`
    when given: a fault proxy in front of it), keys in a credentials file; `options`
    are further string keys (on_failure = "block")."""
    cred = _credentials_file(p.access_key, p.secret_key)
    extra = "".join(f'{k} = "{v}"\n' for k, v in options.items())
    return (
        f'\n[[targets]]\nname = "{name}"\nendpoint = "{endpoint or p.endpoint}"\n'
        f'bucket = "{bucket}"\nprefix = "{prefix}"\nmode = "{mode}"\n{extra}'
        f'credentials = {{ file = "{cred}" }}\n'
    )


@pytest.fixture
def make_target() -> Callable[..., TargetConfig]:
    return target_for


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mount]:
    """A fresh volume mounted at `mounted.mountpoint` by a real daemon; unmounted after."""
    m = Mount.create(tmp_path / "vol")
    m.start()
    try:
        yield m
    finally:
        m.cleanup()
