"""The heartbeat document (format/heartbeat.py): round trips; untrusted bytes refused cleanly."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaultsync.errors import FormatError
from vaultsync.format.bucket_layout import heartbeat_key, parse_heartbeat_key
from vaultsync.format.heartbeat import MAX_SIZE, Heartbeat

HB = Heartbeat(7, "site-a", "0123abcd", 42, 5.0, 5.0, 2.5, 1_700_000_000_000_000_000)


def test_round_trip_and_key() -> None:
    assert Heartbeat.from_bytes(HB.to_bytes(), "t") == HB
    assert heartbeat_key(7) == "heartbeat/0000000000000007.json"
    assert parse_heartbeat_key(heartbeat_key(7)) == 7
    assert parse_heartbeat_key("heartbeat/7.json") is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("site"),
        lambda d: d.update(counter="42"),
        lambda d: d.update(epoch=True),
        lambda d: d.update(epoch=-1),
        lambda d: d.update(hold=float("inf")),
        lambda d: d.update(site="x" * 300),
        lambda d: d.update(counter=2**70),
    ],
)
def test_wrong_fields_are_refused_with_the_place(mutate: object) -> None:
    doc = json.loads(HB.to_bytes())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(FormatError, match="voter 'x'"):
        Heartbeat.from_bytes(json.dumps(doc).encode(), "voter 'x'")


def test_oversized_and_non_json_are_refused() -> None:
    with pytest.raises(FormatError, match="not a heartbeat"):
        Heartbeat.from_bytes(b" " * (MAX_SIZE + 1), "w")
    for raw in (b"\xff\xfe", b"[1]", b"nul"):
        with pytest.raises(FormatError):
            Heartbeat.from_bytes(raw, "w")


@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_any_bytes_decode_or_raise_format_error(raw: bytes) -> None:
    with contextlib.suppress(FormatError):
        Heartbeat.from_bytes(raw, "w")
