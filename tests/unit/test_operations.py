"""The FUSE adapter's request wrappers (fuse/operations.py), called without a mount.

`_errors` turns what a request raises into the errno the kernel gets, and
refuses every request while the catalog is stale; `_changes` refuses a change
on a read-only mount and holds it at the acknowledgement gate, before it starts
and again before it answers.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest

from vaultsync.engine.filesystem import FileSystem
from vaultsync.engine.posix import FsError
from vaultsync.engine.volume import Volume
from vaultsync.format.header import new_header
from vaultsync.format.txn import ROOT_INO
from vaultsync.fuse.operations import Operations

CTX = SimpleNamespace(uid=0, gid=0)


@pytest.fixture
async def ops(tmp_path: Path) -> AsyncIterator[Operations]:
    vol = await Volume.create(tmp_path / "state", new_header("ops", 64 * 1024, 1))
    try:
        yield Operations(FileSystem(vol))
    finally:
        await vol.close()


async def _mknod(ops: Operations, name: bytes) -> Any:
    return await ops.mknod(ROOT_INO, name, stat.S_IFREG | 0o644, 0, CTX)


async def test_a_read_only_mount_refuses_changes_and_answers_reads(ops: Operations) -> None:
    await _mknod(ops, b"before")
    ops.read_only = True
    with pytest.raises(pyfuse3.FUSEError) as refused:
        await _mknod(ops, b"after")
    assert refused.value.errno == errno.EROFS
    assert (await ops.getattr(ROOT_INO)).st_ino == ROOT_INO
    assert (await ops.lookup(ROOT_INO, b"before")).st_ino > ROOT_INO


class Gate:
    """Says shut or open as `answers` go (then open); refuses instead of opening when
    `refuse`, as once another site writes."""

    def __init__(self, *answers: bool, refuse: bool = False) -> None:
        self.answers, self.refuse, self.waits = list(answers), refuse, 0

    def is_open(self) -> bool:
        return self.answers.pop(0) if self.answers else True

    async def wait_open(self) -> None:
        self.waits += 1
        if self.refuse:
            raise FsError(errno.EROFS)


async def test_a_change_waits_for_the_gate_before_it_starts_and_before_it_answers(
    ops: Operations,
) -> None:
    ops.gate = before = Gate(False, True)
    await _mknod(ops, b"a")
    assert before.waits == 1
    ops.gate = after = Gate(True, False)
    await _mknod(ops, b"b")
    assert after.waits == 1
    # Refused at the start: nothing is made.
    ops.gate = Gate(False, refuse=True)
    with pytest.raises(pyfuse3.FUSEError) as refused:
        await _mknod(ops, b"c")
    assert refused.value.errno == errno.EROFS
    assert ops.fs.cat.lookup(ROOT_INO, b"c") is None
    # Refused before the answer: made (it stays in the journal), but not acknowledged.
    ops.gate = Gate(True, False, refuse=True)
    with pytest.raises(pyfuse3.FUSEError) as refused:
        await _mknod(ops, b"d")
    assert refused.value.errno == errno.EROFS
    assert ops.fs.cat.lookup(ROOT_INO, b"d") is not None
