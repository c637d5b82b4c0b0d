"""One process at a time holds a state directory; a second opener learns who does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vaultsync.engine.state_lock import VolumeInUseError, lock_holder, read_pid, take_lock
from vaultsync.format.state_layout import StateDir


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    held = take_lock(tmp_path)
    try:
        StateDir(tmp_path).pid.write_text(f"{os.getpid()}\n/mnt/x\n")
        # flock() locks belong to the open file, so a second open in this process conflicts.
        with pytest.raises(VolumeInUseError, match=f"already mounted by process {os.getpid()}"):
            take_lock(tmp_path)
    finally:
        held.close()
    take_lock(tmp_path).close()  # free again once the holder let go


def test_read_pid_is_none_without_a_readable_pid_file(tmp_path: Path) -> None:
    assert read_pid(tmp_path) is None
    StateDir(tmp_path).pid.write_text("")
    assert read_pid(tmp_path) is None
    StateDir(tmp_path).pid.write_text("not a pid\n")
    assert read_pid(tmp_path) is None
    StateDir(tmp_path).pid.write_text("4242\n/mnt/x\n")
    assert read_pid(tmp_path) == 4242


def test_the_holder_is_named_only_while_the_lock_is_held(tmp_path: Path) -> None:
    assert lock_holder(tmp_path) is None  # not even a lock file yet
    StateDir(tmp_path).pid.write_text("4242\n/mnt/x\n")
    held = take_lock(tmp_path)
    try:
        assert lock_holder(tmp_path) == 4242
    finally:
        held.close()
    assert lock_holder(tmp_path) is None, "a stale mount.pid names nobody"
