"""Unit tests for vaultsync/chunks.py: the chunk and transaction payload pipeline."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import replace

import blake3
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.errors import CorruptRecordError, CryptoError
from vaultsync.format import segment as seg
from vaultsync.format.chunks import PROBE, PROBE_ABOVE, Codec
from vaultsync.format.crypto import VolumeKeys
from vaultsync.format.segment import CHUNK_ID_SIZE

KEYS_A = VolumeKeys.from_master(bytes(range(32)))
KEYS_B = VolumeKeys.from_master(bytes(range(1, 33)))

CODECS: dict[str, Callable[[], Codec]] = {
    "plain": lambda: Codec(0),
    "zstd": lambda: Codec(3),
    "encrypted": lambda: Codec(0, KEYS_A),
    "zstd+encrypted": lambda: Codec(3, KEYS_A),
}

DATA = st.one_of(
    st.binary(max_size=4096),
    # Compressible: repeated short patterns.
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 2000)).map(lambda t: t[0] * t[1]),
)


def _flip_payload_byte(rec: seg.Record, index: int) -> seg.Record:
    p = bytearray(rec.payload)
    p[index] ^= 0x01
    return replace(rec, payload=bytes(p))


@pytest.mark.parametrize("name", list(CODECS))
def test_chunk_round_trip(name: str) -> None:
    codec = CODECS[name]()

    @settings(max_examples=100, deadline=None)
    @given(DATA, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
    def check(data: bytes, lsn: int, time_ns: int) -> None:
        cid, rec = codec.chunk_record(data, lsn, time_ns)
        assert len(cid) == CHUNK_ID_SIZE
        assert (rec.type, rec.lsn, rec.time_ns) == (seg.RecordType.CHUNK, lsn, time_ns)
        assert rec.payload[:CHUNK_ID_SIZE] == cid
        assert cid == codec.chunk_id(data)
        assert codec.decode_chunk(rec) == data
        assert codec.decode_chunk(rec, expect_id=cid) == data
        # Through the on-disk framing as well.
        assert codec.decode_chunk(seg.decode_record(seg.encode_record(rec))) == data
        assert bool(rec.flags & seg.FLAG_ENCRYPTED) == (codec.keys is not None)
        if codec.level == 0:
            assert not rec.flags & seg.FLAG_ZSTD
        if not rec.flags:
            assert rec.payload[CHUNK_ID_SIZE:] == data

    check()


@pytest.mark.parametrize("name", list(CODECS))
def test_txn_round_trip(name: str) -> None:
    codec = CODECS[name]()

    @settings(max_examples=100, deadline=None)
    @given(DATA, st.integers(0, 2**64 - 1))
    def check(body: bytes, lsn: int) -> None:
        rec = codec.txn_record(body, lsn, 99)
        assert (rec.type, rec.lsn, rec.time_ns) == (seg.RecordType.TXN, lsn, 99)
        assert codec.decode_txn(rec) == body
        assert bool(rec.flags & seg.FLAG_ENCRYPTED) == (codec.keys is not None)
        if not rec.flags:
            assert rec.payload == body

    check()


def test_memoryview_input() -> None:
    data = b"abc" * 5000
    for make in CODECS.values():
        codec = make()
        cid, rec = codec.chunk_record(memoryview(data), 1, 1)
        assert cid == codec.chunk_id(data)
        assert codec.decode_chunk(rec) == data


# -- compression -----------------------------------------------------------------


def test_compressible_data_is_stored_as_a_zstd_frame() -> None:
    data = b"all work and no play " * 4000
    _, rec = Codec(3).chunk_record(data, 1, 1)
    assert rec.flags == seg.FLAG_ZSTD
    stored = rec.payload[CHUNK_ID_SIZE:]
    assert len(stored) < len(data) // 10
    # A standard zstd frame that carries its content size (docs/format.md §6.2).
    assert zstandard.frame_content_size(stored) == len(data)
    assert zstandard.ZstdDecompressor().decompress(stored) == data


def test_incompressible_data_is_stored_as_is() -> None:
    data = os.urandom(8192)
    cid, rec = Codec(19).chunk_record(data, 1, 1)
    assert rec.flags == 0
    assert rec.payload == cid + data


def test_a_chunk_whose_start_does_not_compress_is_not_compressed_at_all() -> None:
    """The probe: random (media, archives) first, compressible after it, is kept as is;
    compressible first is compressed whole, however random the rest."""
    text = b"all work and no play " * 4000
    random_first = os.urandom(PROBE) + text[: 60 * 1024]
    cid, rec = Codec(3).chunk_record(random_first, 1, 1)
    assert rec.flags == 0 and rec.payload == cid + random_first
    text_first = text[:PROBE] + os.urandom(60 * 1024)
    _, rec = Codec(3).chunk_record(text_first, 1, 1)
    assert rec.flags == seg.FLAG_ZSTD and len(rec.payload) < len(text_first)
    assert Codec(3).decode_chunk(rec) == text_first
    small = os.urandom(100) + b"\0" * (PROBE_ABOVE - 100)  # not probed: compressed
    assert Codec(3).chunk_record(small, 1, 1)[1].flags == seg.FLAG_ZSTD


def test_small_transactions_are_stored_plain_large_ones_compressed() -> None:
    c = Codec(3)
    small = b'{"v":1,"ops":[]}' * 10
    rec = c.txn_record(small, 7, 1)
    assert rec.flags == 0 and rec.payload == small and c.decode_txn(rec) == small
    big = b'{"op": "dirent", "name": "file"}, ' * 200
    rec = c.txn_record(big, 8, 1)
    assert rec.flags == seg.FLAG_ZSTD and len(rec.payload) < len(big) and c.decode_txn(rec) == big


def test_level_zero_never_compresses() -> None:
    data = b"\0" * 65536
    _, rec = Codec(0).chunk_record(data, 1, 1)
    assert rec.flags == 0
    assert len(rec.payload) == CHUNK_ID_SIZE + len(data)
    assert Codec(0).txn_record(data, 1, 1).flags == 0


def test_encrypted_and_compressed_is_smaller_than_plaintext() -> None:
    data = b"x" * 100_000
    _, rec = Codec(3, KEYS_A).chunk_record(data, 1, 1)
    assert rec.flags == seg.FLAG_ZSTD | seg.FLAG_ENCRYPTED
    assert len(rec.payload) < 1000


def test_broken_zstd_frame_is_corrupt() -> None:
    data = b"hello " * 1000
    _, rec = Codec(3).chunk_record(data, 1, 1)
    bad = replace(rec, payload=rec.payload[: CHUNK_ID_SIZE + 10])
    with pytest.raises(CorruptRecordError, match="does not decompress"):
        Codec(3).decode_chunk(bad)


def test_decompression_limit_is_enforced() -> None:
    """`limit` bounds what a (possibly hostile) frame may expand to."""
    data = b"\0" * 1_000_000
    codec = Codec(3)
    _, rec = codec.chunk_record(data, 1, 1)
    assert rec.flags & seg.FLAG_ZSTD
    with pytest.raises(CorruptRecordError):
        codec.decode_chunk(rec, limit=4096)
    txn = codec.txn_record(data, 1, 1)
    with pytest.raises(CorruptRecordError):
        codec.decode_txn(txn, limit=4096)


# -- ids ----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_unencrypted_ids_are_plain_blake3_and_stable(data: bytes) -> None:
    expected = blake3.blake3(data).digest()
    assert Codec(0).chunk_id(data) == expected
    assert Codec(3).chunk_id(data) == expected
    assert Codec(3).chunk_record(data, 1, 1)[0] == expected


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_encrypted_ids_are_keyed(data: bytes) -> None:
    a = Codec(3, KEYS_A).chunk_id(data)
    assert a == blake3.blake3(data, key=KEYS_A.chunk_id_key).digest()
    # Stable for one volume (same keys, any codec instance or level).
    assert Codec(0, VolumeKeys.from_master(bytes(range(32)))).chunk_id(data) == a
    # Different for another volume, and reveal nothing of the plain hash.
    assert Codec(3, KEYS_B).chunk_id(data) != a
    assert blake3.blake3(data).digest() != a


def test_same_plaintext_encrypts_differently_each_time() -> None:
    codec = Codec(0, KEYS_A)
    cid1, r1 = codec.chunk_record(b"same", 1, 1)
    cid2, r2 = codec.chunk_record(b"same", 1, 1)
    assert cid1 == cid2
    assert r1.payload != r2.payload  # random nonces


# -- tampering and mismatched keys ---------------------------------------------------


def test_every_tampered_ciphertext_byte_raises_crypto_error() -> None:
    codec = Codec(3, KEYS_A)
    _, rec = codec.chunk_record(b"secret data " * 50, 4, 4)
    for i in range(CHUNK_ID_SIZE, len(rec.payload)):  # nonce, ciphertext, tag
        with pytest.raises(CryptoError, match="failed authentication"):
            codec.decode_chunk(_flip_payload_byte(rec, i))


def test_tampered_chunk_id_of_encrypted_chunk_fails() -> None:
    codec = Codec(0, KEYS_A)
    _, rec = codec.chunk_record(b"payload", 1, 1)
    for i in range(CHUNK_ID_SIZE):
        with pytest.raises(CryptoError):
            codec.decode_chunk(_flip_payload_byte(rec, i))


def test_truncated_ciphertext_is_crypto_error() -> None:
    codec = Codec(0, KEYS_A)
    _, rec = codec.chunk_record(b"payload", 1, 1)
    for n in (0, 5, 12, 27):
        bad = replace(rec, payload=rec.payload[: CHUNK_ID_SIZE + n])
        with pytest.raises(CryptoError):
            codec.decode_chunk(bad)


def test_tampered_txn_ciphertext_raises_crypto_error() -> None:
    codec = Codec(3, KEYS_A)
    rec = codec.txn_record(b'{"v":1,"ops":[]}', 7, 7)
    for i in range(len(rec.payload)):
        with pytest.raises(CryptoError):
            codec.decode_txn(_flip_payload_byte(rec, i))


def test_encrypted_txn_is_bound_to_its_lsn() -> None:
    codec = Codec(0, KEYS_A)
    rec = codec.txn_record(b'{"v":1,"ops":[]}', 7, 7)
    with pytest.raises(CryptoError):
        codec.decode_txn(replace(rec, lsn=8))


def test_encrypted_payload_layout_matches_format_doc() -> None:
    """nonce(12) || AES-256-GCM(data key) with AAD "chunk"+id / "txn"+LSN."""
    codec = Codec(0, KEYS_A)
    cid, rec = codec.chunk_record(b"plain chunk", 1, 1)
    sealed = rec.payload[CHUNK_ID_SIZE:]
    aead = AESGCM(KEYS_A.data_key)
    assert aead.decrypt(sealed[:12], sealed[12:], b"chunk" + cid) == b"plain chunk"
    trec = codec.txn_record(b"body", 0x0102, 1)
    assert (
        aead.decrypt(trec.payload[:12], trec.payload[12:], b"txn" + struct.pack("<Q", 0x0102))
        == b"body"
    )


def test_wrong_volume_key_fails_authentication() -> None:
    _, rec = Codec(3, KEYS_A).chunk_record(b"data " * 100, 1, 1)
    with pytest.raises(CryptoError):
        Codec(3, KEYS_B).decode_chunk(rec)
    trec = Codec(3, KEYS_A).txn_record(b"{}", 1, 1)
    with pytest.raises(CryptoError):
        Codec(3, KEYS_B).decode_txn(trec)


def test_unencrypted_record_in_encrypted_volume_is_refused() -> None:
    """A downgrade (plaintext record injected into an encrypted volume) is refused."""
    _, rec = Codec(3).chunk_record(b"injected", 1, 1)
    with pytest.raises(CorruptRecordError, match="unencrypted record"):
        Codec(3, KEYS_A).decode_chunk(rec)
    with pytest.raises(CorruptRecordError, match="unencrypted record"):
        Codec(3, KEYS_A).decode_txn(Codec(3).txn_record(b"{}", 1, 1))


def test_encrypted_record_without_keys_is_refused() -> None:
    _, rec = Codec(3, KEYS_A).chunk_record(b"x", 1, 1)
    with pytest.raises(CorruptRecordError, match="without keys"):
        Codec(3).decode_chunk(rec)


def test_unencrypted_tampering_is_caught_by_the_hash() -> None:
    codec = Codec(0)
    _, rec = codec.chunk_record(b"some file content", 1, 1)
    for i in range(len(rec.payload)):
        with pytest.raises(CorruptRecordError):
            codec.decode_chunk(_flip_payload_byte(rec, i))


def test_expect_id_mismatch() -> None:
    codec = Codec(0)
    _, rec = codec.chunk_record(b"a", 1, 1)
    with pytest.raises(CorruptRecordError, match="expected"):
        codec.decode_chunk(rec, expect_id=codec.chunk_id(b"b"))


def test_wrong_record_types() -> None:
    codec = Codec(0)
    txn = codec.txn_record(b"{}", 1, 1)
    with pytest.raises(CorruptRecordError, match="not a chunk"):
        codec.decode_chunk(txn)
    _, chunk = codec.chunk_record(b"a", 1, 1)
    with pytest.raises(CorruptRecordError, match="not a transaction"):
        codec.decode_txn(chunk)
    with pytest.raises(CorruptRecordError, match="not a chunk"):
        codec.decode_chunk(seg.Record(seg.RecordType.CHUNK, 1, 1, b"\0" * 31))
