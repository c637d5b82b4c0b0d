"""Client-side encryption: a random master key, wrapped by a passphrase-derived key.

Why two keys: the passphrase only unlocks (wraps) the master key, so changing
the passphrase rewrites one field of the header and no data. The master key
never leaves memory; from it HKDF derives one key per purpose, so the chunk-id
key (which makes chunk addresses reveal nothing about content) and the AEAD key
are independent.

Argon2id is the memory-hard KDF (cryptography >= 44 ships it); its parameters
travel in the header so a reader needs nothing but the passphrase.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vaultsync.errors import CryptoError, FormatError

NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost. The defaults follow RFC 9106's second recommended option."""

    salt: bytes
    iterations: int = 3
    memory_kib: int = 64 * 1024
    lanes: int = 4

    def to_json(self) -> dict[str, Any]:
        return {
            "algorithm": "argon2id",
            "salt": base64.b64encode(self.salt).decode(),
            "iterations": self.iterations,
            "memory_kib": self.memory_kib,
            "lanes": self.lanes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KdfParams:
        if d.get("algorithm") != "argon2id":
            raise FormatError(f"unsupported key derivation {d.get('algorithm')!r} in volume header")
        try:
            p = cls(
                salt=base64.b64decode(d["salt"], validate=True),
                iterations=int(d["iterations"]),
                memory_kib=int(d["memory_kib"]),
                lanes=int(d["lanes"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise FormatError(f"volume header: malformed kdf parameters ({e})") from None
        # Argon2id's own limits (RFC 9106 3.1), checked here so damage reads as damage.
        if len(p.salt) < 8 or p.iterations < 1 or p.lanes < 1 or p.memory_kib < 8 * p.lanes:
            raise FormatError("volume header: kdf parameters are out of range (damaged header?)")
        return p


def derive_kek(passphrase: str, params: KdfParams) -> bytes:
    kdf = Argon2id(
        salt=params.salt,
        length=KEY_SIZE,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    )
    return kdf.derive(passphrase.encode("utf-8"))


def _wrap_aad(volume_id: bytes) -> bytes:
    return b"vaultsync-key-wrap:" + volume_id


def wrap_master_key(master: bytes, kek: bytes, volume_id: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(kek).encrypt(nonce, master, _wrap_aad(volume_id))


def unwrap_master_key(wrapped: bytes, kek: bytes, volume_id: bytes) -> bytes:
    if len(wrapped) != NONCE_SIZE + KEY_SIZE + 16:  # nonce, key, GCM tag
        raise FormatError("volume header: wrapped key has the wrong length (damaged header?)")
    try:
        key = AESGCM(kek).decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:], _wrap_aad(volume_id))
    except InvalidTag:
        raise CryptoError(
            "wrong passphrase for this encrypted volume (the header's key did not unlock); "
            "check VAULTSYNC_PASSPHRASE or volume.passphrase_file"
        ) from None
    if len(key) != KEY_SIZE:
        raise FormatError("volume header: wrapped key has the wrong length")
    return key


def _subkey(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=purpose).derive(master)


@dataclass(frozen=True)
class VolumeKeys:
    """The per-purpose keys of an encrypted volume."""

    chunk_id_key: bytes  # BLAKE3 key: chunk address = keyed hash of plaintext
    data_key: bytes  # AES-256-GCM key for chunk and transaction payloads

    @classmethod
    def from_master(cls, master: bytes) -> VolumeKeys:
        return cls(
            chunk_id_key=_subkey(master, b"vaultsync chunk-id v1"),
            data_key=_subkey(master, b"vaultsync data v1"),
        )


class Sealer:
    """AES-256-GCM with a random nonce per message: nonce || ciphertext || tag.

    Random 96-bit nonces are safe here: one volume encrypts far fewer than
    2^32 messages under one key.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise CryptoError("encrypted payload is too short: damaged data")
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
        except InvalidTag:
            raise CryptoError("encrypted payload failed authentication: damaged data") from None
