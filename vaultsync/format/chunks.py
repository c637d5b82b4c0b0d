"""The chunk pipeline: address, compress, encrypt, and the exact reverse on read.

A chunk's id is the BLAKE3 hash of its plaintext (keyed with a volume key when
the volume is encrypted, so ids reveal nothing about content). Ids make
deduplication free and let every read check what it got: `decode_chunk`
returns plaintext only after its hash matched, whichever provider sent it.

Pure and thread-safe: the volume calls these from worker threads (BLAKE3 and
zstd release the GIL), so nothing here touches shared mutable state.
"""

from __future__ import annotations

import struct
import threading

import blake3
import zstandard

from vaultsync.errors import CorruptRecordError
from vaultsync.format import patch
from vaultsync.format.crypto import Sealer, VolumeKeys
from vaultsync.format.patch import PatchPlan, Range
from vaultsync.format.segment import (
    CHUNK_ID_SIZE,
    FLAG_ENCRYPTED,
    FLAG_PATCH,
    FLAG_ZSTD,
    Record,
    RecordType,
    patch_base,
)

_LSN = struct.Struct("<Q")
# Below this a transaction is stored as it is: zstd would save a few dozen bytes
# of a few hundred and cost more than the rest of the commit (every metadata op).
TXN_COMPRESS_MIN = 1024
# A larger payload whose first PROBE bytes do not shrink is stored as it is:
# random or already-compressed data (media, archives, encrypted files) costs
# zstd several times what hashing it does, for nothing. A small one (a 4 KiB
# block rewritten and fsynced, on the path every fsync waits for) is probed
# with its first SMALL_PROBE bytes.
PROBE = 4096
PROBE_ABOVE = 16 * 1024
SMALL_PROBE = 512
SMALL_PROBE_ABOVE = 2048


class PatchNeedsBase(Exception):
    """A patch record was given to decode without its base's plaintext.

    Not an error of the data: the reader fetches `base` (an ordinary chunk) and
    decodes again with it.
    """

    def __init__(self, base: bytes) -> None:
        super().__init__(f"patch of chunk {base.hex()[:16]}…")
        self.base = base


class Codec:
    """Turns plaintext into stored payloads for one volume's parameters and keys."""

    def __init__(self, compression_level: int, keys: VolumeKeys | None = None) -> None:
        # Level 0 means "store uncompressed" (zstd would read it as its default level).
        self.level = compression_level
        self.keys = keys
        self._sealer = Sealer(keys.data_key) if keys else None
        self._local = threading.local()

    # -- ids -------------------------------------------------------------
    def chunk_id(self, data: bytes | memoryview) -> bytes:
        if self.keys is not None:
            return blake3.blake3(data, key=self.keys.chunk_id_key, max_threads=1).digest()
        return blake3.blake3(data, max_threads=1).digest()

    # -- compression ------------------------------------------------------
    def _compress(self, data: bytes | memoryview) -> tuple[bytes, int]:
        if self.level <= 0:
            return bytes(data), 0
        c = getattr(self._local, "cctx", None)
        if c is None:
            c = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        if len(data) > PROBE_ABOVE and len(c.compress(data[:PROBE])) >= PROBE * 31 // 32:
            return bytes(data), 0
        # zstd's frame alone is a dozen bytes: incompressible 512 bytes grow.
        small = SMALL_PROBE_ABOVE < len(data) <= PROBE_ABOVE
        if small and len(c.compress(data[:SMALL_PROBE])) >= SMALL_PROBE:
            return bytes(data), 0
        packed = c.compress(data)
        # Incompressible data is stored as is: never pay for a bigger copy.
        if len(packed) >= len(data):
            return bytes(data), 0
        return packed, FLAG_ZSTD

    def _decompress(self, data: bytes, flags: int, limit: int) -> bytes:
        if not flags & FLAG_ZSTD:
            return data
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        try:
            # A frame that states its size is decompressed to that size regardless of
            # max_output_size: refuse a forged size before allocating it.
            stated = zstandard.frame_content_size(data)
            if stated > limit:
                raise CorruptRecordError(
                    f"compressed payload claims {stated} bytes, more than the limit {limit}"
                )
            return d.decompress(data, max_output_size=limit)
        except zstandard.ZstdError as e:
            raise CorruptRecordError(f"compressed payload does not decompress: {e}") from None

    # -- encryption -------------------------------------------------------
    def _seal(self, data: bytes, flags: int, aad: bytes) -> tuple[bytes, int]:
        if self._sealer is None:
            return data, flags
        return self._sealer.seal(data, aad), flags | FLAG_ENCRYPTED

    def _open(self, data: bytes, flags: int, aad: bytes) -> bytes:
        if not flags & FLAG_ENCRYPTED:
            if self._sealer is not None:
                raise CorruptRecordError("unencrypted record in an encrypted volume")
            return data
        if self._sealer is None:
            raise CorruptRecordError("encrypted record but the volume is opened without keys")
        return self._sealer.open(data, aad)

    # -- chunks -----------------------------------------------------------
    def chunk_record(
        self, data: bytes | memoryview, lsn: int, time_ns: int
    ) -> tuple[bytes, Record]:
        """The chunk id and the CHUNK record that stores `data`."""
        cid = self.chunk_id(data)
        packed, flags = self._compress(data)
        stored, flags = self._seal(packed, flags, b"chunk" + cid)
        return cid, Record(RecordType.CHUNK, lsn, time_ns, cid + stored, flags)

    def patch_record(
        self, data: bytes | memoryview, plan: PatchPlan, lsn: int, time_ns: int
    ) -> tuple[bytes, Record]:
        """The chunk id of `data` and a CHUNK record storing it as a patch of `plan.base`."""
        cid = self.chunk_id(data)
        plain = patch.encode(data, plan.keep, plan.ranges)
        packed, flags = self._compress(plain)
        stored, flags = self._seal(packed, flags, b"patch" + cid + plan.base)
        payload = cid + plan.base + stored
        return cid, Record(RecordType.CHUNK, lsn, time_ns, payload, flags | FLAG_PATCH)

    def _chunk_plain(self, rec: Record, expect_id: bytes | None, limit: int) -> bytes:
        """The stored plaintext of a CHUNK record: the chunk itself, or a patch."""
        if rec.type is not RecordType.CHUNK or len(rec.payload) < CHUNK_ID_SIZE:
            raise CorruptRecordError("not a chunk record")
        cid = rec.payload[:CHUNK_ID_SIZE]
        if expect_id is not None and cid != expect_id:
            raise CorruptRecordError(
                f"chunk record holds {cid.hex()[:16]}…, expected {expect_id.hex()[:16]}…"
            )
        base = patch_base(rec)
        if base is None:
            packed = self._open(rec.payload[CHUNK_ID_SIZE:], rec.flags, b"chunk" + cid)
        else:
            stored = rec.payload[2 * CHUNK_ID_SIZE :]
            packed = self._open(stored, rec.flags, b"patch" + cid + base)
        return self._decompress(packed, rec.flags, limit)

    def decode_chunk(
        self,
        rec: Record,
        expect_id: bytes | None = None,
        limit: int = 1 << 27,
        base: bytes | None = None,
    ) -> bytes:
        """Plaintext of a CHUNK record, verified against its id (and `expect_id`).

        A patch record needs `base`, the plaintext of the chunk it patches
        (`PatchNeedsBase` says which one when it is missing).
        """
        base_id = patch_base(rec) if rec.type is RecordType.CHUNK else None
        if base_id is not None and base is None:
            raise PatchNeedsBase(base_id)
        plain = self._chunk_plain(rec, expect_id, limit)
        data = plain if base is None or base_id is None else patch.apply(base, plain)
        cid = rec.payload[:CHUNK_ID_SIZE]
        if self.chunk_id(data) != cid:
            raise CorruptRecordError(f"chunk {cid.hex()[:16]}… does not match its hash")
        return data

    def patch_info(self, rec: Record, limit: int = 1 << 27) -> tuple[bytes, int, list[Range]]:
        """(base id, keep, ranges) of a patch record: decoded and checked for form, which
        is all that can be checked of it without its base."""
        base = patch_base(rec)
        if base is None:
            raise CorruptRecordError("not a patch record")
        _length, keep, ranges, _pos = patch.parse(self._chunk_plain(rec, None, limit))
        return base, keep, ranges

    # -- transactions -----------------------------------------------------
    def txn_record(self, body: bytes, lsn: int, time_ns: int) -> Record:
        packed, flags = self._compress(body) if len(body) >= TXN_COMPRESS_MIN else (body, 0)
        stored, flags = self._seal(packed, flags, b"txn" + _LSN.pack(lsn))
        return Record(RecordType.TXN, lsn, time_ns, stored, flags)

    def checkpoint_record(self, image: bytes, lsn: int, time_ns: int) -> Record:
        """A catalog image as of `lsn`, compressed and sealed like a transaction."""
        packed, flags = self._compress(image)
        stored, flags = self._seal(packed, flags, b"ckpt" + _LSN.pack(lsn))
        return Record(RecordType.CHECKPOINT, lsn, time_ns, stored, flags)

    def decode_checkpoint(self, rec: Record, limit: int = 1 << 34) -> bytes:
        if rec.type is not RecordType.CHECKPOINT:
            raise CorruptRecordError("not a checkpoint record")
        packed = self._open(rec.payload, rec.flags, b"ckpt" + _LSN.pack(rec.lsn))
        return self._decompress(packed, rec.flags, limit)

    def decode_txn(self, rec: Record, limit: int = 1 << 30) -> bytes:
        if rec.type is not RecordType.TXN:
            raise CorruptRecordError("not a transaction record")
        packed = self._open(rec.payload, rec.flags, b"txn" + _LSN.pack(rec.lsn))
        return self._decompress(packed, rec.flags, limit)
