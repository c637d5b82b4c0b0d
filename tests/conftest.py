"""The tiers, and the session-wide real S3 servers on loopback.

Tests live in one directory per thing they need, and carry its marker:
`unit/` (neither a server nor a mount: `pytest -m unit`, the fast tier),
`mount/` (a real FUSE mount, no server) and `servers/` (real S3 servers, often
a mount too). A test that asks for more than its directory provides is a
collection error, so the fast tier stays fast. Helpers live in `support/`.

Each server is started once per session on free ports with its own keys, and
stopped by its PID at the end. Tests isolate themselves with fresh buckets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.mounting import Mount
from tests.support.targets import new_keys, target_for
from vaultsync.commands.local_servers import LocalProvider, start_rclone, start_seaweedfs
from vaultsync.config import TargetConfig

TIERS = ("unit", "mount", "servers")
# What a tier may not ask for: the fixtures that start servers, or mount.
_SERVER_FIXTURES = {"seaweedfs", "rclone", "provider"}
_FORBIDDEN = {"unit": _SERVER_FIXTURES | {"mounted"}, "mount": _SERVER_FIXTURES, "servers": set()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.path)).parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests live in tests/{{{','.join(TIERS)}}}/")
        item.add_marker(getattr(pytest.mark, tier))
        wrong = _FORBIDDEN[tier] & set(getattr(item, "fixturenames", ()))
        if wrong:
            raise pytest.UsageError(
                f"{item.nodeid} uses {', '.join(sorted(wrong))}, which tests/{tier}/ does not "
                "provide: move it to the tier that does"
            )


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProvider]:
    ak, sk = new_keys()
    p = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), access_key=ak, secret_key=sk)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="session")
def rclone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalProvider]:
    ak, sk = new_keys()
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
