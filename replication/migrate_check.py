"""Per-kind verification of an object read from a source, before it may go to B.

A migration must never be a trust-me copy: each kind is checked by what it
means, not only by a transport checksum. Segments are parsed and every chunk
record is decoded and checked against its id (BLAKE3, docs/format.md §6.1),
except a patch whose base lies in an earlier segment, which is decoded and
checked for form (and authenticity, encrypted) alone; every transaction
decrypted/decompressed; checkpoints are decoded as records;
small JSON objects are parsed and must name what their key names; kinds this
version does not know are checked by the MD5 their source listed.

Pure and CPU-bound: callers run `check_object` in a worker thread.
"""

from __future__ import annotations

import json
from typing import Any

from vaultsync.errors import FormatError
from vaultsync.format import segment as seg
from vaultsync.format.bucket_layout import parse_checkpoint_key, parse_lease_key
from vaultsync.format.chunks import Codec
from vaultsync.format.header import VolumeHeader
from vaultsync.replication.migrate_plan import SNAPSHOTS, Item, is_plain_md5
from vaultsync.store.objectstore import md5_hex

_SQLITE_MAGIC = b"SQLite format 3\x00"


class CheckFailed(Exception):
    """The bytes are not a good copy of the object; `str()` says why."""


def _json_object(data: bytes, key: str) -> dict[str, Any]:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckFailed(f"{key}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckFailed(f"{key}: not a JSON object")
    return doc


def check_segment(data: bytes, segno: int, header: VolumeHeader, codec: Codec) -> int:
    """A whole sealed segment of this volume; every chunk matches its id. Returns last LSN."""
    where = f"segment {segno}"
    try:
        scan = seg.scan_segment(data, where)
    except FormatError as e:
        raise CheckFailed(str(e)) from None
    h = scan.header
    if h.volume_id != header.volume_id or h.segment_no != segno:
        raise CheckFailed(f"{where}: belongs to another volume or position")
    if not scan.sealed or scan.stop_reason:
        raise CheckFailed(f"{where}: damaged ({scan.stop_reason or 'not sealed'})")
    last_lsn = 0
    # Bases of the patches here that are stored here too: those patches are checked whole.
    want = {b for _o, r in scan.records if (b := seg.patch_base(r)) is not None}
    bases: dict[bytes, bytes] = {}
    try:
        for _off, rec in scan.records:
            if rec.type is seg.RecordType.CHUNK:
                base_id = seg.patch_base(rec)
                if base_id is None:
                    plain = codec.decode_chunk(rec)  # raises unless it hashes to its id
                    cid = rec.payload[: seg.CHUNK_ID_SIZE]
                    if cid in want:
                        bases[cid] = plain
                elif base_id in bases:
                    codec.decode_chunk(rec, base=bases[base_id])
                else:  # its base is in an earlier segment: form (and tag, encrypted) only
                    codec.patch_info(rec)
            elif rec.type is seg.RecordType.TXN:
                codec.decode_txn(rec)
            elif rec.type is seg.RecordType.SEAL:
                last_lsn = seg.parse_seal(rec.payload)[1]
            else:
                raise CheckFailed(f"{where}: a {rec.type.name} record has no place in a segment")
    except (FormatError, ValueError) as e:
        raise CheckFailed(f"{where}: {e}") from None
    except Exception as e:  # AES-GCM refuses a forged or damaged payload with its own type
        raise CheckFailed(f"{where}: a record does not decrypt ({type(e).__name__})") from None
    return last_lsn


def check_checkpoint(data: bytes, key: str, codec: Codec) -> None:
    parsed = parse_checkpoint_key(key)
    assert parsed is not None
    try:
        rec = seg.decode_record(data, key)
        if rec.type is not seg.RecordType.CHECKPOINT or rec.lsn != parsed[0]:
            raise CheckFailed(f"{key}: holds a {rec.type.name} record of LSN {rec.lsn}")
        image = codec.decode_checkpoint(rec)
    except FormatError as e:
        raise CheckFailed(str(e)) from None
    except CheckFailed:
        raise
    except Exception as e:
        raise CheckFailed(f"{key}: does not decrypt ({type(e).__name__})") from None
    if not image.startswith(_SQLITE_MAGIC):
        raise CheckFailed(f"{key}: the image is not a SQLite database")


def check_object(item: Item, data: bytes, header: VolumeHeader, codec: Codec) -> int | None:
    """Raise CheckFailed unless `data` is a good copy of `item`; a segment's last LSN."""
    if len(data) != item.size:
        raise CheckFailed(f"{item.key}: {len(data)} bytes, the listing said {item.size}")
    if item.kind == "segment":
        return check_segment(data, item.segno, header, codec)
    if item.kind == "checkpoint":
        check_checkpoint(data, item.key, codec)
    elif item.kind == "header":
        try:
            found = VolumeHeader.from_bytes(data, item.key)
        except FormatError as e:
            raise CheckFailed(str(e)) from None
        if found.volume_id != header.volume_id:
            raise CheckFailed(f"{item.key}: names volume {found.volume_id_hex}")
    elif item.kind == "lease":
        doc = _json_object(data, item.key)
        if doc.get("epoch") != parse_lease_key(item.key):
            raise CheckFailed(f"{item.key}: says epoch {doc.get('epoch')!r}")
    elif item.kind == "snapshot":
        doc = _json_object(data, item.key)
        name = item.key[len(SNAPSHOTS) : -len(".json")]
        if doc.get("name") != name or not isinstance(doc.get("lsn"), int):
            raise CheckFailed(f"{item.key}: does not name snapshot {name!r} with an LSN")
    elif is_plain_md5(item.etag) and md5_hex(data) != item.etag.lower():
        raise CheckFailed(f"{item.key}: MD5 {md5_hex(data)} differs from the listed {item.etag}")
    return None
