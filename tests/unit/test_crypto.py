"""Unit tests for vaultsync/crypto.py: KDF parameters, key wrapping, derived keys, AEAD."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.errors import CryptoError, FormatError
from vaultsync.format import crypto

# Cheap Argon2id cost so that tests stay fast; the format carries the cost anyway.
FAST = crypto.KdfParams(salt=b"saltsalt1234", iterations=1, memory_kib=8, lanes=1)
VID = bytes(range(16))


def _hkdf_sha256(ikm: bytes, info: bytes) -> bytes:
    """RFC 5869 with no salt (a zero-filled HashLen salt) and L = 32, from the stdlib."""
    prk = hmac.new(b"\0" * 32, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


# -- KDF parameters ----------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.binary(min_size=8, max_size=64),
    st.integers(1, 10),
    st.integers(8, 1 << 22),
    st.integers(1, 16),
)
def test_kdf_params_json_round_trip(salt: bytes, t: int, m: int, p: int) -> None:
    m = max(m, 8 * p)  # Argon2id needs at least 8 KiB per lane
    params = crypto.KdfParams(salt=salt, iterations=t, memory_kib=m, lanes=p)
    d = params.to_json()
    assert d == {
        "algorithm": "argon2id",
        "salt": base64.b64encode(salt).decode(),
        "iterations": t,
        "memory_kib": m,
        "lanes": p,
    }
    assert crypto.KdfParams.from_json(d) == params


def test_kdf_defaults_follow_rfc9106_second_option() -> None:
    p = crypto.KdfParams(salt=b"x" * 16)
    assert (p.iterations, p.memory_kib, p.lanes) == (3, 65536, 4)


@pytest.mark.parametrize("algorithm", ["scrypt", "argon2i", None, "ARGON2ID"])
def test_kdf_unknown_algorithm_is_refused(algorithm: str | None) -> None:
    d = FAST.to_json()
    d["algorithm"] = algorithm
    with pytest.raises(FormatError, match="unsupported key derivation"):
        crypto.KdfParams.from_json(d)


@pytest.mark.parametrize(
    "change",
    [
        {"salt": "not base64!"},
        {"salt": None},
        {"iterations": "three"},
        {"memory_kib": None},
        {"lanes": [4]},
    ],
)
def test_kdf_malformed_params_are_format_errors(change: dict[str, object]) -> None:
    d: dict[str, object] = {**FAST.to_json(), **change}
    with pytest.raises(FormatError, match="malformed kdf"):
        crypto.KdfParams.from_json(d)


@pytest.mark.parametrize("missing", ["salt", "iterations", "memory_kib", "lanes"])
def test_kdf_missing_field_is_format_error(missing: str) -> None:
    d = FAST.to_json()
    del d[missing]
    with pytest.raises(FormatError, match="malformed kdf"):
        crypto.KdfParams.from_json(d)


# -- key derivation and wrapping --------------------------------------------------------


def test_derive_kek_is_deterministic_and_depends_on_every_input() -> None:
    k = crypto.derive_kek("correct horse", FAST)
    assert len(k) == crypto.KEY_SIZE == 32
    assert crypto.derive_kek("correct horse", FAST) == k
    others = {
        crypto.derive_kek("correct horsE", FAST),
        crypto.derive_kek("correct horse", crypto.KdfParams(b"saltsalt1235", 1, 8, 1)),
        crypto.derive_kek("correct horse", crypto.KdfParams(b"saltsalt1234", 2, 8, 1)),
        crypto.derive_kek("correct horse", crypto.KdfParams(b"saltsalt1234", 1, 16, 1)),
        crypto.derive_kek("correct horse", crypto.KdfParams(b"saltsalt1234", 1, 16, 2)),
    }
    assert k not in others
    assert len(others) == 5


def test_derive_kek_encodes_passphrase_as_utf8() -> None:
    assert crypto.derive_kek("pässwörd", FAST) != crypto.derive_kek("passwort", FAST)
    assert len(crypto.derive_kek("🔑" * 100, FAST)) == 32


def test_wrap_unwrap_round_trip() -> None:
    master = os.urandom(32)
    kek = crypto.derive_kek("pw", FAST)
    wrapped = crypto.wrap_master_key(master, kek, VID)
    assert len(wrapped) == crypto.NONCE_SIZE + 32 + crypto.TAG_SIZE
    assert crypto.unwrap_master_key(wrapped, kek, VID) == master
    # Random nonce: wrapping twice gives different bytes for the same key.
    assert crypto.wrap_master_key(master, kek, VID) != wrapped


def test_wrapped_key_layout_matches_format_doc() -> None:
    master = os.urandom(32)
    kek = crypto.derive_kek("pw", FAST)
    wrapped = crypto.wrap_master_key(master, kek, VID)
    nonce, body = wrapped[:12], wrapped[12:]
    assert AESGCM(kek).decrypt(nonce, body, b"vaultsync-key-wrap:" + VID) == master


def test_unwrap_with_wrong_passphrase_is_a_clear_crypto_error() -> None:
    wrapped = crypto.wrap_master_key(os.urandom(32), crypto.derive_kek("right", FAST), VID)
    with pytest.raises(CryptoError) as ei:
        crypto.unwrap_master_key(wrapped, crypto.derive_kek("wrong", FAST), VID)
    msg = str(ei.value)
    assert "wrong passphrase" in msg
    assert "VAULTSYNC_PASSPHRASE" in msg and "passphrase_file" in msg
    assert "\n" not in msg


def test_wrapped_key_is_bound_to_the_volume_id() -> None:
    kek = crypto.derive_kek("pw", FAST)
    wrapped = crypto.wrap_master_key(os.urandom(32), kek, VID)
    with pytest.raises(CryptoError):
        crypto.unwrap_master_key(wrapped, kek, bytes(16))


def test_tampered_wrapped_key_fails() -> None:
    kek = crypto.derive_kek("pw", FAST)
    wrapped = crypto.wrap_master_key(os.urandom(32), kek, VID)
    for i in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[i] ^= 0x80
        with pytest.raises(CryptoError):
            crypto.unwrap_master_key(bytes(bad), kek, VID)


def test_wrapped_key_of_wrong_length_is_format_error() -> None:
    kek = crypto.derive_kek("pw", FAST)
    nonce = os.urandom(12)
    wrapped = nonce + AESGCM(kek).encrypt(nonce, b"k" * 16, b"vaultsync-key-wrap:" + VID)
    with pytest.raises(FormatError, match="wrong length"):
        crypto.unwrap_master_key(wrapped, kek, VID)


@pytest.mark.parametrize("size", [0, 4, 7])
def test_truncated_wrapped_key_is_a_clear_error(size: int) -> None:
    """A damaged header (wrapped_key cut short) must not escape as a bare ValueError."""
    kek = crypto.derive_kek("pw", FAST)
    wrapped = crypto.wrap_master_key(os.urandom(32), kek, VID)
    with pytest.raises((CryptoError, FormatError)):
        crypto.unwrap_master_key(wrapped[:size], kek, VID)


# -- derived keys -----------------------------------------------------------------------


def test_volume_keys_follow_hkdf_sha256_of_format_doc() -> None:
    master = bytes(range(32))
    keys = crypto.VolumeKeys.from_master(master)
    assert keys.chunk_id_key == _hkdf_sha256(master, b"vaultsync chunk-id v1")
    assert keys.data_key == _hkdf_sha256(master, b"vaultsync data v1")
    assert keys.chunk_id_key != keys.data_key
    assert crypto.VolumeKeys.from_master(master) == keys
    assert crypto.VolumeKeys.from_master(bytes(32)) != keys


# -- AEAD --------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048), st.binary(max_size=64))
def test_sealer_round_trip(plaintext: bytes, aad: bytes) -> None:
    s = crypto.Sealer(bytes(range(32)))
    sealed = s.seal(plaintext, aad)
    assert len(sealed) == crypto.NONCE_SIZE + len(plaintext) + crypto.TAG_SIZE
    assert s.open(sealed, aad) == plaintext
    with pytest.raises(CryptoError, match="failed authentication"):
        s.open(sealed, aad + b"x")


def test_sealer_rejects_tampering_wrong_key_and_short_input() -> None:
    s = crypto.Sealer(bytes(range(32)))
    sealed = s.seal(b"message", b"aad")
    assert s.seal(b"message", b"aad") != sealed  # fresh nonce each time
    for i in range(len(sealed)):
        bad = bytearray(sealed)
        bad[i] ^= 1
        with pytest.raises(CryptoError):
            s.open(bytes(bad), b"aad")
    with pytest.raises(CryptoError):
        crypto.Sealer(bytes(32)).open(sealed, b"aad")
    for n in (0, 11, 12, 27):
        with pytest.raises(CryptoError, match="too short"):
            s.open(sealed[:n], b"aad")
