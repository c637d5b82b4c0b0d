"""migrate's check of a segment before it may go to B, for segments holding patch chunks.

A patch whose base is in the same segment is decoded whole and checked against its
id; one whose base lies in an earlier segment is checked for form (and, encrypted,
authenticity); a patch that does not apply to its base is refused either way it can be.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from vaultsync.format import segment as seg
from vaultsync.format.chunks import Codec
from vaultsync.format.header import new_header
from vaultsync.format.patch import PatchPlan
from vaultsync.replication.migrate_check import CheckFailed, check_segment


def _segment(header_id: bytes, segno: int, records: list[seg.Record]) -> bytes:
    body = [seg.SegmentHeader(header_id, segno, 0, 1).pack()]
    body += [seg.encode_record(r) for r in records]
    last = max(r.lsn for r in records)
    body.append(
        seg.encode_record(
            seg.Record(seg.RecordType.SEAL, last, 1, seg.seal_payload(len(records), last))
        )
    )
    return b"".join(body)


@pytest.mark.parametrize("passphrase", [None, "pw"])
def test_segments_with_patches_pass_and_bad_patches_do_not(passphrase: str | None) -> None:
    header = new_header("m", 64 * 1024, 3, passphrase)
    codec = Codec(3, header.unlock(passphrase))
    base = os.urandom(64 * 1024)
    bid, base_rec = codec.chunk_record(base, 1, 1)
    block = bytearray(base)
    block[100:4196] = os.urandom(4096)
    plan = PatchPlan(bid, len(base), ((100, 4096),))
    _pid, patch_rec = codec.patch_record(bytes(block), plan, 2, 2)
    txn = codec.txn_record(b'{"v":1,"ops":[]}', 2, 2)
    vid = header.volume_id

    # Base and patch in one segment: checked whole.
    assert check_segment(_segment(vid, 1, [base_rec, patch_rec, txn]), 1, header, codec) == 2
    # The patch alone in a later segment: its base is elsewhere, its form is checked.
    assert check_segment(_segment(vid, 2, [patch_rec, txn]), 2, header, codec) == 2

    # A patch that is well formed but not of this base (another block's bytes under
    # this id) is refused when its base is at hand.
    _, other = codec.patch_record(bytes(block[::-1]), plan, 2, 2)
    forged = replace(other, payload=patch_rec.payload[:64] + other.payload[64:])
    with pytest.raises(CheckFailed):
        check_segment(_segment(vid, 1, [base_rec, forged, txn]), 1, header, codec)
    if passphrase is not None:  # and, encrypted, even without it: it does not authenticate
        with pytest.raises(CheckFailed):
            check_segment(_segment(vid, 2, [forged, txn]), 2, header, codec)
