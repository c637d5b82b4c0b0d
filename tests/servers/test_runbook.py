"""docs/runbook.md, run as written: a real site A burns, site B takes over, A comes back.

The commands come from the runbook's ```sh site=X part=N blocks, verbatim and
in order, each run as one `bash -euo pipefail` script with the variables the
runbook's table lists. Change a command in the doc and this test runs the
changed command.

The story around them is real too: site A writes through a real FUSE mount
to SeaweedFS (`near`, sync) and rclone (`far`, async) on loopback, its daemon
is killed with SIGKILL and its state directory deleted, so site B works from
the buckets alone. A copy of A's state directory, taken before the deletion,
stands for A's disk when A is repaired and comes back (part 2): it must be
fenced, and salvage must list the write it never shipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.mounting import Mount
from tests.support.targets import credentials_file
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.control.lease import TEST_WINDOW_ENV
from vaultsync.engine.state_lock import read_pid
from vaultsync.fuse.mount import lazy_unmount, mounted_at

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "runbook.md"
UNIT_DIR = ROOT / "vaultsync" / "units"

_FENCE = re.compile(r"^```(\S*)([^\n]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    lang: str
    attrs: dict[str, str]
    text: str

    @property
    def site(self) -> str | None:
        return self.attrs.get("site")

    @property
    def part(self) -> int | None:
        p = self.attrs.get("part")
        return int(p) if p else None


def runbook_blocks(text: str) -> list[Block]:
    """Every fenced block: language, key=value attributes of the info string, body."""
    out = []
    for m in _FENCE.finditer(text):
        attrs = dict(a.split("=", 1) for a in m.group(2).split() if "=" in a)
        out.append(Block(m.group(1), attrs, m.group(3)))
    return out


def test_runbook_blocks_follow_the_convention() -> None:
    blocks = [b for b in runbook_blocks(RUNBOOK.read_text()) if b.lang == "sh"]
    runnable = [b for b in blocks if b.site]
    assert {b.site for b in runnable} == {"A", "B"}
    assert all(b.part in (1, 2) for b in runnable), "every site block says its part"
    parts = [b.part for b in runnable if b.part is not None]
    assert parts == sorted(parts), "part 1 blocks come before part 2 blocks"
    # The commands the doc test cannot run (no systemd there) name units that exist.
    others = [b for b in blocks if not b.site]
    assert others, "the runbook shows the systemd equivalents"
    units = {p.name for p in UNIT_DIR.glob("*.service")}
    for b in others:
        for line in b.text.strip().splitlines():
            assert line.startswith("systemctl "), f"an unrun block holds {line!r}"
            for unit in re.findall(r"(vaultsync-[a-z]+@)\S*\.service", line):
                assert f"{unit}.service" in units, line
    # Every variable the runnable blocks use is in the runbook's table.
    table = set(re.findall(r"^\| `([A-Z_]+)`(?:, `([A-Z_]+)`)?", RUNBOOK.read_text(), re.M))
    documented = {v for row in table for v in row if v}
    used = {v for b in runnable for v in re.findall(r"\$\{?([A-Z][A-Z_]+)", b.text)}
    used -= {"EOF"}
    assert used <= documented, f"undocumented variables: {sorted(used - documented)}"


def _fsync_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _wait_shipped(state_dir: Path, target: str, timeout: float = 30) -> None:
    """Until the daemon reports `target` holds at least one whole segment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            snap = json.loads((state_dir / "replication.json").read_text())
            if snap["targets"][target]["watermark_segment"] > 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"target {target} never received a whole segment")


def _release(mountpoint: Path, state_dir: Path, env: dict[str, str]) -> None:
    """Teardown: unmount what the runbook mounted; kill its daemon by PID if it hangs."""
    pid = read_pid(state_dir)
    if mounted_at(mountpoint) is not None:
        subprocess.run(
            ["vaultsync", "umount", str(mountpoint)], env=env, capture_output=True, timeout=120
        )
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            if mounted_at(mountpoint) is not None:
                os.kill(pid, signal.SIGKILL)
    if mounted_at(mountpoint) is not None:
        lazy_unmount(mountpoint)


def test_runbook_recovers_site_b_and_fails_back(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 1 s lease window for A's daemon and both promotions alike (the environment
    # reaches every command): each promotion waits 2 s instead of the real 20 s, which
    # made this the slowest test of the suite (41 s). The commands are unchanged.
    monkeypatch.setenv(TEST_WINDOW_ENV, "1.0")
    blocks = [b for b in runbook_blocks(RUNBOOK.read_text()) if b.lang == "sh" and b.site]
    bucket = f"rb-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(bucket)
    rclone.create_bucket(bucket)
    near_cred = credentials_file(seaweedfs.access_key, seaweedfs.secret_key)
    far_cred = credentials_file(rclone.access_key, rclone.secret_key)

    # Site A before the disaster: its own config, a real mount, real writes.
    site_a = tmp_path / "siteA"
    site_a.mkdir()
    a_cfg = site_a / "projects.toml"
    a_cfg.write_text(
        '[volume]\nname = "projects"\nstate_dir = "state"\n'
        # Small segments sealed by size only: what A fsyncs last lives in tail pieces.
        'segment_size = "1MiB"\nsegment_max_age = 600\n'
        f'\n[[targets]]\nname = "near"\nendpoint = "{seaweedfs.endpoint}"\n'
        f'bucket = "{bucket}"\nprefix = "projects"\nmode = "sync"\n'
        f'credentials = {{ file = "{near_cred}" }}\n'
        f'\n[[targets]]\nname = "far"\nendpoint = "{rclone.endpoint}"\n'
        f'bucket = "{bucket}"\nprefix = "projects"\nmode = "async"\n'
        f'credentials = {{ file = "{far_cred}" }}\n'
    )
    res = subprocess.run(
        [sys.executable, "-m", "vaultsync", "init", str(a_cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    (site_a / "mnt").mkdir()
    a = Mount(site_a, a_cfg, site_a / "mnt")
    a_state = site_a / "state"
    site_b = tmp_path / "siteB"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "COLUMNS": "250",  # rich wraps at 80 columns when not on a terminal
        "VOLUME": "projects",
        "SITE_A_CONFIG": str(a_cfg),
        "SITE_B_CONFIG": str(site_b / "etc" / "projects.toml"),
        "SITE_B_STATE": str(site_b / "state"),
        "SITE_A_MNT": str(a.mountpoint),
        "SITE_B_MNT": str(site_b / "mnt"),
        "NEAR_ENDPOINT": seaweedfs.endpoint,
        "FAR_ENDPOINT": rclone.endpoint,
        "BUCKET": bucket,
        "PREFIX": "projects",
        "NEAR_CREDENTIALS": str(near_cred),
        "FAR_CREDENTIALS": str(far_cred),
        "TARGET": "near",
        "RESTORE_DIR": str(tmp_path / "restore"),
        "SALVAGE_DIR": str(tmp_path / "salvage"),
    }
    b_mnt, b_state = site_b / "mnt", site_b / "state"
    big = os.urandom(2_500_000)
    plan = b"plan: written and fsynced at A\n"
    ledger = b"date,amount\n2026-11-25,1200\n"
    draft = b"draft: closed at A, never fsynced, A burned a second later\n"
    a.start()
    try:
        mnt = a.mountpoint
        (mnt / "projects").mkdir()
        (mnt / "finance").mkdir()
        _fsync_write(mnt / "projects" / "big.bin", big)  # seals segments by size
        _wait_shipped(a_state, "far")
        _fsync_write(mnt / "projects" / "plan.txt", plan)
        _fsync_write(mnt / "finance" / "ledger.csv", ledger)
        (mnt / "projects" / "draft.txt").write_bytes(draft)
        time.sleep(1.5)  # committed to A's journal on close; shipped nowhere
        a.kill9()  # site A is gone...
    finally:
        a.cleanup()
    disk = tmp_path / "siteA-disk"
    shutil.copytree(a_state, disk, symlinks=True)
    shutil.rmtree(a_state)  # ...and so is its state directory

    outputs: list[tuple[Block, str]] = []

    def run(part: int) -> None:
        for b in blocks:
            if b.part != part:
                continue
            r = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", b.text],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert r.returncode == 0, f"site {b.site} block failed:\n{b.text}\n{r.stdout}{r.stderr}"
            outputs.append((b, r.stdout))

    def output_of(site: str, part: int, command: str) -> list[str]:
        return [o for b, o in outputs if b.site == site and b.part == part and command in b.text]

    try:
        run(1)
        # Applications at B see A's fsynced files.
        assert (b_mnt / "projects" / "plan.txt").read_bytes() == plan
        assert (b_mnt / "finance" / "ledger.csv").read_bytes() == ledger
        assert (b_mnt / "projects" / "big.bin").read_bytes() == big
        assert (tmp_path / "restore" / "ledger.csv").read_bytes() == ledger
        # The write A closed but never fsynced reached no target: it is not at B.
        assert not (b_mnt / "projects" / "draft.txt").exists()
        points = output_of("B", 1, "vaultsync points")[0]
        assert "near" in points and "far" in points and "tail piece" in points
        assert "epoch 1" in output_of("B", 1, "vaultsync promote")[0]
        status_b = output_of("B", 1, "vaultsync status")[-1]
        assert "mounted: yes" in status_b and "FENCED" not in status_b
        # The applications at B carry on writing.
        _fsync_write(b_mnt / "projects" / "from_b.txt", b"written at B after the failover\n")

        # Site A is repaired and comes back with its disk.
        shutil.move(disk, a_state)
        run(2)
        status_a = output_of("A", 2, "vaultsync status")[0]
        assert "FENCED" in status_a and "epoch 1" in status_a
        salvage = output_of("A", 2, "vaultsync salvage")[0]
        assert "/projects/draft.txt" in salvage
        assert (tmp_path / "salvage" / "projects" / "draft.txt").read_bytes() == draft
        # After failing back, A has B's writes and what it chose to put back.
        assert (a.mountpoint / "projects" / "from_b.txt").read_bytes().startswith(b"written at B")
        assert (a.mountpoint / "projects" / "plan.txt").read_bytes() == plan
        assert (a.mountpoint / "projects" / "draft.txt").read_bytes() == draft
        assert "promoted" in output_of("A", 2, "vaultsync promote")[0]
        # B, now the standby, knows it is fenced.
        assert "FENCED" in output_of("B", 2, "vaultsync points")[0]
        assert mounted_at(b_mnt) is None
    finally:
        _release(a.mountpoint, a_state, env)
        _release(b_mnt, b_state, env)
