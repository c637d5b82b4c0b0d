"""Automatic failover drills: two sites on real servers, each behind its own fault proxies.

Three voters: two data targets (one sync, one async) and a witness, all
buckets of the session's SeaweedFS (it honours conditional creates; rclone's
server does not, so it cannot vote). Every drill is bounded in time and
checks what the brief promises: every fsync the old writer acknowledged is at
the new writer byte for byte; the old writer acknowledges nothing once the
takeover began; nothing happens when nothing should.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mounting import fsync_path
from tests.support.sites import Site, TargetSpec, sites
from vaultsync.commands.local_servers import LocalProvider

FAILOVER_AFTER = 6.0


def _targets() -> list[TargetSpec]:
    tag = uuid.uuid4().hex[:8]
    return [
        TargetSpec("d1", f"fo-{tag}-d1", mode="sync"),
        TargetSpec("d2", f"fo-{tag}-d2", mode="async"),
        TargetSpec("w", f"fo-{tag}-w", role="witness"),
    ]


# Each hook leaves a line in its site's directory: which hook, for which epoch.
HOOK = """import os, pathlib
root = pathlib.Path(os.environ["VAULTSYNC_MOUNTPOINT"]).parent
with open(root / "hooks", "a") as f:
    f.write(os.environ["VAULTSYNC_HOOK"] + " " + os.environ["VAULTSYNC_EPOCH"] + "\\n")
"""


def _hooks(tmp: Path) -> str:
    script = tmp / "hook.py"
    script.write_text(HOOK)
    cmd = f'["{sys.executable}", "{script}"]'
    return f"on_promote = {cmd}\non_demote = {cmd}\n"


@pytest.fixture
def two(tmp_path: Path, seaweedfs: LocalProvider) -> Iterator[dict[str, Site]]:
    with sites(
        tmp_path,
        seaweedfs,
        ["a", "b"],
        _targets(),
        failover_after=FAILOVER_AFTER,
        failover_extra=_hooks(tmp_path),
    ) as s:
        yield s


def _hook_lines(site: Site) -> list[str]:
    try:
        return (site.root / "hooks").read_text().split()
    except FileNotFoundError:
        return []


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _writable(site: Site) -> bool:
    probe = site.mountpoint / f".probe-{uuid.uuid4().hex[:6]}"
    try:
        _write(probe, b"x")
        return True
    except OSError:
        return False


def _start_pair(s: dict[str, Site]) -> tuple[Site, Site]:
    a, b = s["a"], s["b"]
    a.start()
    a.wait_role("writer", 30)
    a.wait_for("writable", lambda: _writable(a), 30)
    b.start(timeout=90)
    b.wait_role("standby", 60)
    return a, b


def test_a_killed_writer_is_replaced_and_loses_no_fsynced_write(two: dict[str, Site]) -> None:
    a, b = _start_pair(two)
    files = {f"f{i}": os.urandom(5000 + i) for i in range(20)}
    for name, data in files.items():
        _write(a.mountpoint / name, data)
    # The standby follows: the files show up read-only there while A still writes.
    b.wait_for("following", lambda: (b.mountpoint / "f0").exists(), 30)
    assert (b.mountpoint / "f0").read_bytes() == files["f0"]  # now in B's kernel caches
    files["f0"] = os.urandom(7000)
    _write(a.mountpoint / "f0", files["f0"])
    # Within seconds, not after the kernel's 30 s attribute timeout: B invalidates.
    seen = b.wait_for(
        "showing the rewrite", lambda: (b.mountpoint / "f0").read_bytes() == files["f0"], 25
    )
    assert seen < 10, seen
    with pytest.raises(OSError) as ei:
        _write(b.mountpoint / "nope", b"x")
    assert ei.value.errno == errno.EROFS
    last = os.urandom(3000)
    _write(a.mountpoint / "last", last)  # fsynced: the sync target holds it
    killed = time.monotonic()
    a.kill9()
    b.wait_for("writable", lambda: _writable(b), FAILOVER_AFTER + 30)
    took = time.monotonic() - killed
    assert took <= FAILOVER_AFTER + 10, took
    for name, data in files.items():
        assert (b.mountpoint / name).read_bytes() == data, name
    assert (b.mountpoint / "last").read_bytes() == last
    st = b.status()["volume"]["failover"]
    assert st["role"] == "writer" and st["epoch"] == 1 and st["takeover"]["from_site"] == "a"
    b.wait_for("on_promote", lambda: _hook_lines(b) == ["on_promote", "1"], 30)


def test_a_frozen_writer_thawed_after_the_takeover_gets_errors(two: dict[str, Site]) -> None:
    a, b = _start_pair(two)
    _write(a.mountpoint / "x", b"before the freeze")
    fd = os.open(a.mountpoint / "open-during", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        a.freeze()
        b.wait_role("writer", FAILOVER_AFTER + 30)
        _write(b.mountpoint / "x", b"written at b")
        a.thaw()
        # The thawed writer must never say a change was stored: its gate ran out while
        # it was frozen, and its next lease check finds epoch 1.
        with pytest.raises(OSError) as ei:
            os.write(fd, b"late")
            os.fsync(fd)
        assert ei.value.errno in (errno.EROFS, errno.EIO)
    finally:
        os.close(fd)
    a.wait_role("fenced", 30)
    a.wait_for("on_demote", lambda: _hook_lines(a) == ["on_demote", "1"], 30)
    assert (b.mountpoint / "x").read_bytes() == b"written at b"
    assert (a.mountpoint / "x").read_bytes() == b"before the freeze"


def test_one_voter_down_changes_nothing(two: dict[str, Site]) -> None:
    a, b = _start_pair(two)
    for site in (a, b):
        site.proxies["d2"].outage()  # the async data target is down for everyone
    for i in range(int(FAILOVER_AFTER * 2.5)):
        _write(a.mountpoint / f"g{i}", b"x" * 100)  # acknowledged all along
        time.sleep(1)
    assert b.role() == "standby" and a.role() == "writer"


def test_a_writer_restarted_within_failover_after_stays_the_writer(two: dict[str, Site]) -> None:
    a, b = _start_pair(two)
    _write(a.mountpoint / "kept", b"kept")
    a.kill9()
    a.start()
    a.wait_role("writer", 30)
    a.wait_for("writable", lambda: _writable(a), 30)
    time.sleep(FAILOVER_AFTER * 1.5)
    assert b.role() == "standby" and a.role() == "writer"
    assert (a.mountpoint / "kept").read_bytes() == b"kept"


def test_a_standby_cut_off_from_every_voter_does_not_take_over(two: dict[str, Site]) -> None:
    a, b = _start_pair(two)
    b.cut()
    time.sleep(FAILOVER_AFTER * 2.5)
    assert _writable(a)
    assert b.role() == "standby"
    b.heal()


def test_a_writer_cut_off_stops_acknowledging_before_the_standby_starts(
    two: dict[str, Site],
) -> None:
    a, b = _start_pair(two)
    _write(a.mountpoint / "before", b"before")
    fsync_path(a.mountpoint / "before")
    a.cut()
    # Within a hold (a third of failover_after) A stops answering writes with success.
    t0 = time.monotonic()
    acked_after: list[float] = []
    while time.monotonic() - t0 < FAILOVER_AFTER * 3:
        if _writable(a):
            acked_after.append(time.monotonic() - t0)
        if b.role() == "writer":
            break
        time.sleep(0.3)
    b.wait_role("writer", FAILOVER_AFTER + 30)
    started = time.monotonic() - t0
    assert all(t < started for t in acked_after)
    assert not acked_after or max(acked_after) <= FAILOVER_AFTER / 3 + 2
    assert (b.mountpoint / "before").read_bytes() == b"before"
    a.heal()
    a.wait_role("fenced", 30)
    with pytest.raises(OSError) as ei:
        _write(a.mountpoint / "late", b"x")
    assert ei.value.errno in (errno.EROFS, errno.EIO)
    assert not (b.mountpoint / "late").exists()


def test_two_standbys_race_and_exactly_one_wins(tmp_path: Path, seaweedfs: LocalProvider) -> None:
    with sites(
        tmp_path, seaweedfs, ["a", "b", "c"], _targets(), failover_after=FAILOVER_AFTER
    ) as s:
        a, b, c = s["a"], s["b"], s["c"]
        a.start()
        a.wait_role("writer", 30)
        a.wait_for("writable", lambda: _writable(a), 30)
        for site in (b, c):
            site.start(timeout=90)
            site.wait_role("standby", 60)
        _write(a.mountpoint / "f", b"from a")
        a.kill9()
        won = b.wait_for(
            "a writer among b and c",
            lambda: "writer" in (b.role(), c.role()),
            FAILOVER_AFTER + 30,
        )
        assert won <= FAILOVER_AFTER + 10
        time.sleep(FAILOVER_AFTER)  # the loser has had every chance to take over too
        roles = sorted([b.role() or "", c.role() or ""])
        assert roles == ["standby", "writer"], roles
        winner, loser = (b, c) if b.role() == "writer" else (c, b)
        _write(winner.mountpoint / "g", b"from the winner")
        # The loser follows the new writer's history.
        loser.wait_for("following", lambda: (loser.mountpoint / "g").exists(), 30)
        assert (loser.mountpoint / "g").read_bytes() == b"from the winner"
        assert (loser.mountpoint / "f").read_bytes() == b"from a"


def test_an_idle_writer_is_never_replaced(two: dict[str, Site]) -> None:
    a, b = _start_pair(two)
    time.sleep(FAILOVER_AFTER * 4)  # no write at all: the heartbeat alone keeps it
    assert a.role() == "writer" and b.role() == "standby"
    assert _writable(a)


def test_a_standby_sharing_the_writers_site_name_does_not_take_over(
    two: dict[str, Site],
) -> None:
    a, b = two["a"], two["b"]
    b.config.write_text(b.config.read_text().replace('[site]\nname = "b"', '[site]\nname = "a"'))
    a, b = _start_pair(two)
    a.kill9()
    b.wait_for("refusing", lambda: "two sites share a [site] name" in b.tail(), FAILOVER_AFTER * 3)
    assert b.role() == "standby"
