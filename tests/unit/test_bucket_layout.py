"""Bucket keys (format/bucket_layout.py): each kind's key is read back as what it was made
from, and a key of another kind is not taken for one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaultsync.format import bucket_layout as layout

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)


@given(names)
def test_a_snapshot_key_is_read_back_as_its_name(name: str) -> None:
    assert layout.is_snapshot_name(name)
    key = layout.snapshot_key(name)
    assert key.startswith(layout.SNAPSHOTS)
    assert layout.parse_snapshot_key(key) == name
    assert layout.parse_segment_key(key) is None


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", "a/b", "a b", "a\n", "x" * 129, "é", "../up"]
)
def test_a_name_the_format_does_not_allow_makes_no_key(name: str) -> None:
    assert not layout.is_snapshot_name(name)
    with pytest.raises(ValueError, match="not a snapshot name"):
        layout.snapshot_key(name)
    assert layout.parse_snapshot_key(f"{layout.SNAPSHOTS}{name}.json") is None


@given(st.integers(0, 2**64 - 1))
def test_numbered_keys_are_read_back(n: int) -> None:
    assert layout.parse_segment_key(layout.segment_key(n)) == n
    assert layout.parse_relocation_key(layout.relocation_key(n)) == n
    assert layout.parse_lease_key(layout.lease_key(n)) == n
    assert layout.parse_heartbeat_key(layout.heartbeat_key(n)) == n
    assert layout.parse_checkpoint_key(layout.checkpoint_key(n, n // 3)) == (n, n // 3)
    assert layout.parse_tail_key(layout.tail_key(n, 0, n)) == (n, 0, n)
