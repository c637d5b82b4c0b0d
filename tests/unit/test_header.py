"""Unit tests for vaultsync/header.py: the volume header and passphrase handling."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultsync.errors import CryptoError, FormatError, NewerFormatError, VaultsyncError
from vaultsync.format import crypto
from vaultsync.format.header import (
    FORMAT_VERSION,
    Encryption,
    VolumeHeader,
    new_header,
)

FAST = crypto.KdfParams(salt=b"saltsalt1234", iterations=1, memory_kib=8, lanes=1)


def _fast(salt: bytes = b"othersalt999") -> crypto.KdfParams:
    return crypto.KdfParams(salt=salt, iterations=1, memory_kib=8, lanes=1)


def _encrypted(passphrase: str = "correct horse") -> VolumeHeader:
    return new_header("demo", 65536, 3, passphrase, FAST)


def _doc(h: VolumeHeader) -> dict[str, Any]:
    d: dict[str, Any] = json.loads(h.to_bytes())
    return d


# -- new_header ------------------------------------------------------------------------


def test_new_unencrypted_header() -> None:
    h = new_header("demo", 1 << 20, 3)
    assert h.encryption is None
    assert h.format_version == FORMAT_VERSION == 2
    assert (h.name, h.chunk_size, h.compression_level) == ("demo", 1 << 20, 3)
    u = uuid.UUID(bytes=h.volume_id)
    assert u.version == 4
    assert h.volume_id_hex == h.volume_id.hex()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", h.created_at)
    assert h.unlock(None) is None
    assert h.unlock("anything") is None
    assert new_header("demo", 1 << 20, 3).volume_id != h.volume_id


def test_header_json_matches_format_doc() -> None:
    h = new_header("demo", 1048576, 3)
    d = _doc(h)
    assert d == {
        "format": "vaultsync-volume",
        "format_version": 2,
        "volume_id": str(uuid.UUID(bytes=h.volume_id)),
        "name": "demo",
        "created_at": h.created_at,
        "chunk_size": 1048576,
        "hash": "blake3",
        "compression": {"algorithm": "zstd", "level": 3},
        "encryption": None,
    }
    enc = _doc(_encrypted())["encryption"]
    assert enc["cipher"] == "aes-256-gcm"
    assert enc["kdf"] == FAST.to_json()
    assert isinstance(enc["wrapped_key"], str)


def test_new_encrypted_header_unlocks_with_right_passphrase() -> None:
    h = _encrypted("correct horse")
    assert h.encryption is not None
    assert h.encryption.kdf == FAST
    keys = h.unlock("correct horse")
    assert isinstance(keys, crypto.VolumeKeys)
    assert h.unlock("correct horse") == keys  # same master key every time
    # A second volume with the same passphrase has a different master key.
    assert _encrypted("correct horse").unlock("correct horse") != keys


def test_new_header_default_kdf_has_a_random_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[crypto.KdfParams] = []
    real = crypto.derive_kek

    def cheap(passphrase: str, params: crypto.KdfParams) -> bytes:
        seen.append(params)
        return real(passphrase, replace(params, iterations=1, memory_kib=8, lanes=1))

    monkeypatch.setattr(crypto, "derive_kek", cheap)
    a = new_header("a", 65536, 3, "pw")
    b = new_header("b", 65536, 3, "pw")
    assert a.encryption is not None and b.encryption is not None
    assert len(a.encryption.kdf.salt) >= 16
    assert a.encryption.kdf.salt != b.encryption.kdf.salt
    assert (a.encryption.kdf.iterations, a.encryption.kdf.memory_kib) == (3, 65536)
    assert a.unlock("pw") is not None


def test_wrong_passphrase_is_a_clear_error() -> None:
    h = _encrypted("correct horse")
    with pytest.raises(CryptoError) as ei:
        h.unlock("battery staple")
    msg = str(ei.value)
    assert "wrong passphrase" in msg
    assert "VAULTSYNC_PASSPHRASE" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("missing", [None, ""])
def test_missing_passphrase_says_how_to_give_one(missing: str | None) -> None:
    with pytest.raises(FormatError, match="encrypted") as ei:
        _encrypted().unlock(missing)
    assert "VAULTSYNC_PASSPHRASE" in str(ei.value)
    assert "passphrase_file" in str(ei.value)


def test_empty_passphrase_volume_can_be_unlocked_or_is_refused() -> None:
    """A volume must never be created with a passphrase that unlock() then refuses."""
    try:
        h = new_header("demo", 65536, 3, "", FAST)
    except VaultsyncError:
        return  # refusing an empty passphrase is fine
    assert h.unlock("") is not None


def test_header_copied_to_another_volume_id_does_not_unlock() -> None:
    h = _encrypted("pw")
    other = replace(h, volume_id=uuid.uuid4().bytes)
    with pytest.raises(CryptoError):
        other.unlock("pw")


# -- with_passphrase ---------------------------------------------------------------------


def test_with_passphrase_rewraps_the_same_master_key() -> None:
    h = _encrypted("old pass")
    keys = h.unlock("old pass")
    h2 = h.with_passphrase("old pass", "new pass", _fast())
    assert h2.encryption is not None and h.encryption is not None
    assert h2.encryption.wrapped_key != h.encryption.wrapped_key
    assert h2.encryption.kdf == _fast()
    assert h2.unlock("new pass") == keys
    with pytest.raises(CryptoError):
        h2.unlock("old pass")
    # Everything else about the volume is unchanged.
    assert replace(h2, encryption=h.encryption) == h
    # The rewrapped header survives serialisation.
    assert VolumeHeader.from_bytes(h2.to_bytes()).unlock("new pass") == keys


def test_with_passphrase_needs_the_old_passphrase() -> None:
    h = _encrypted("old pass")
    with pytest.raises(CryptoError, match="wrong passphrase"):
        h.with_passphrase("not it", "new pass", _fast())


def test_with_passphrase_on_unencrypted_volume() -> None:
    with pytest.raises(FormatError, match="not encrypted"):
        new_header("demo", 65536, 3).with_passphrase("a", "b", FAST)


# -- to_bytes / from_bytes ------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    name=st.text(min_size=1, max_size=40),
    chunk_shift=st.integers(12, 26),
    level=st.integers(0, 22),
    vid=st.uuids(version=4),
    encrypted=st.booleans(),
    wrapped=st.binary(min_size=60, max_size=60),
    salt=st.binary(min_size=8, max_size=32),
)
def test_header_bytes_round_trip(
    name: str,
    chunk_shift: int,
    level: int,
    vid: uuid.UUID,
    encrypted: bool,
    wrapped: bytes,
    salt: bytes,
) -> None:
    enc = Encryption(kdf=_fast(salt), wrapped_key=wrapped) if encrypted else None
    h = VolumeHeader(vid.bytes, name, "2026-11-25T06:00:00Z", 1 << chunk_shift, level, enc)
    raw = h.to_bytes()
    raw.decode("utf-8")
    assert VolumeHeader.from_bytes(raw) == h


def test_real_encrypted_header_round_trip() -> None:
    h = _encrypted("pw")
    back = VolumeHeader.from_bytes(h.to_bytes())
    assert back == h
    assert back.unlock("pw") == h.unlock("pw")


def test_the_format_doc_example_parses() -> None:
    raw = b"""{
      "format": "vaultsync-volume",
      "format_version": 1,
      "volume_id": "6f1c1b8e-3c55-4b67-9a53-1f3f0a8e2c11",
      "name": "demo",
      "created_at": "2026-11-25T06:00:00Z",
      "chunk_size": 1048576,
      "hash": "blake3",
      "compression": {"algorithm": "zstd", "level": 3},
      "encryption": null,
      "some_future_field": {"ignored": true}
    }"""
    h = VolumeHeader.from_bytes(raw)
    assert h.volume_id == uuid.UUID("6f1c1b8e-3c55-4b67-9a53-1f3f0a8e2c11").bytes
    assert (h.name, h.chunk_size, h.compression_level, h.encryption) == (
        "demo",
        1048576,
        3,
        None,
    )


@pytest.mark.parametrize("version", [3, 99])
def test_newer_format_version_is_refused_with_upgrade_hint(version: int) -> None:
    d = _doc(_encrypted())
    d["format_version"] = version
    with pytest.raises(NewerFormatError) as ei:
        VolumeHeader.from_bytes(json.dumps(d).encode(), "s3://bkt/volume.json")
    msg = str(ei.value)
    assert f"format version {version}" in msg
    assert "upgrade vaultsync" in msg
    assert "s3://bkt/volume.json" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("version", [0, -1, "1", None, 1.5])
def test_invalid_format_version(version: Any) -> None:
    d = _doc(new_header("demo", 65536, 3))
    d["format_version"] = version
    with pytest.raises(FormatError, match="format_version") as ei:
        VolumeHeader.from_bytes(json.dumps(d).encode())
    assert not isinstance(ei.value, NewerFormatError)


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xff\xfe", b"<xml/>", b"[1,2]", b'"vaultsync-volume"', b'{"format":"other"}', b"{}"],
)
def test_foreign_objects_are_refused(raw: bytes) -> None:
    with pytest.raises(FormatError, match="not a vaultsync volume header") as ei:
        VolumeHeader.from_bytes(raw, "bkt/volume.json")
    assert str(ei.value).startswith("bkt/volume.json")


def _mutate(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for p in parents:
        d = d[p]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("volume_id", "not-a-uuid"),
        ("volume_id", KeyError),
        ("name", KeyError),
        ("created_at", KeyError),
        ("chunk_size", "big"),
        ("chunk_size", KeyError),
        ("hash", "sha256"),
        ("hash", KeyError),
        ("compression", KeyError),
        ("compression.algorithm", "gzip"),
        ("compression.level", KeyError),
        ("encryption", "yes"),
        ("encryption.cipher", "chacha20-poly1305"),
        ("encryption.wrapped_key", "***"),
        ("encryption.wrapped_key", KeyError),
        ("encryption.kdf", KeyError),
        ("encryption.kdf.algorithm", "pbkdf2"),
        ("encryption.kdf.salt", KeyError),
    ],
)
def test_malformed_headers_are_format_errors(path: str, value: Any) -> None:
    d = _doc(_encrypted())
    _mutate(d, path, value)
    with pytest.raises(FormatError) as ei:
        VolumeHeader.from_bytes(json.dumps(d).encode(), "hdr")
    msg = str(ei.value)
    assert msg.startswith("hdr") or "volume header" in msg
    assert not isinstance(ei.value, NewerFormatError)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("encryption.wrapped_key", ""),
        ("encryption.wrapped_key", "AAAA"),
        ("encryption.kdf.salt", "AAAA"),  # 3-byte salt: Argon2id wants at least 8
        ("encryption.kdf.iterations", 0),
        ("encryption.kdf.lanes", 0),
        ("encryption.kdf.memory_kib", 1),
    ],
)
def test_damaged_key_material_in_header_is_a_clear_error(path: str, value: Any) -> None:
    """Damaged key material or KDF cost: a clear error, never a bare ValueError traceback."""
    d = _doc(_encrypted("pw"))
    _mutate(d, path, value)
    try:
        h = VolumeHeader.from_bytes(json.dumps(d).encode())
    except FormatError:
        return
    with pytest.raises((FormatError, CryptoError)):
        h.unlock("pw")
