"""The volume header: the one object that tells a reader how to read everything else.

It is JSON so that an operator (or another implementation) can read it with
`cat`. It is written once by `init` and changes only when the passphrase
does; every other object in the bucket is interpreted through it. A reader
refuses a header whose `format_version` it does not know, because guessing
at a newer layout is how data gets lost. See docs/format.md.
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from vaultsync.errors import CryptoError, FormatError, NewerFormatError
from vaultsync.format import crypto

FORMAT_NAME = "vaultsync-volume"
# 2: chunks may be stored as patches of other chunks (docs/format.md §6.3). Volumes
# of version 1 are read as they are and never get patch records.
FORMAT_VERSION = 2
HEADER_KEY = "volume.json"


@dataclass(frozen=True)
class Encryption:
    kdf: crypto.KdfParams
    wrapped_key: bytes


@dataclass(frozen=True)
class VolumeHeader:
    volume_id: bytes  # 16 random bytes (a UUID4)
    name: str
    created_at: str  # RFC 3339, UTC
    chunk_size: int
    compression_level: int
    encryption: Encryption | None = None
    format_version: int = FORMAT_VERSION

    @property
    def volume_id_hex(self) -> str:
        return self.volume_id.hex()

    def to_bytes(self) -> bytes:
        d: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "volume_id": str(uuid.UUID(bytes=self.volume_id)),
            "name": self.name,
            "created_at": self.created_at,
            "chunk_size": self.chunk_size,
            "hash": "blake3",
            "compression": {"algorithm": "zstd", "level": self.compression_level},
            "encryption": None,
        }
        if self.encryption is not None:
            d["encryption"] = {
                "cipher": "aes-256-gcm",
                "kdf": self.encryption.kdf.to_json(),
                "wrapped_key": base64.b64encode(self.encryption.wrapped_key).decode(),
            }
        return (json.dumps(d, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "volume header") -> VolumeHeader:
        try:
            d = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{where} is not a vaultsync volume header (not JSON)") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise FormatError(f"{where} is not a vaultsync volume header (foreign object)")
        version = d.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise FormatError(f"{where}: invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise NewerFormatError(
                f"{where} has format version {version}, newer than this vaultsync reads "
                f"({FORMAT_VERSION}); upgrade vaultsync to use this volume"
            )
        try:
            enc = None
            if d.get("encryption") is not None:
                e = d["encryption"]
                if e.get("cipher") != "aes-256-gcm":
                    raise FormatError(f"{where}: unsupported cipher {e.get('cipher')!r}")
                enc = Encryption(
                    kdf=crypto.KdfParams.from_json(e["kdf"]),
                    wrapped_key=base64.b64decode(e["wrapped_key"], validate=True),
                )
            if d.get("hash") != "blake3" or d["compression"]["algorithm"] != "zstd":
                raise FormatError(f"{where}: unsupported hash or compression algorithm")
            return cls(
                volume_id=uuid.UUID(d["volume_id"]).bytes,
                name=str(d["name"]),
                created_at=str(d["created_at"]),
                chunk_size=int(d["chunk_size"]),
                compression_level=int(d["compression"]["level"]),
                encryption=enc,
                format_version=version,
            )
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise FormatError(f"{where}: malformed header ({e!r})") from None

    def unlock(self, passphrase: str | None) -> crypto.VolumeKeys | None:
        """The volume's keys, or None for an unencrypted volume."""
        if self.encryption is None:
            return None
        if not passphrase:
            raise FormatError(
                "this volume is encrypted: set the passphrase (VAULTSYNC_PASSPHRASE or "
                "volume.passphrase_file)"
            )
        kek = crypto.derive_kek(passphrase, self.encryption.kdf)
        master = crypto.unwrap_master_key(self.encryption.wrapped_key, kek, self.volume_id)
        return crypto.VolumeKeys.from_master(master)

    def with_passphrase(
        self, old: str, new: str, kdf: crypto.KdfParams | None = None
    ) -> VolumeHeader:
        """The same volume with its master key rewrapped under a new passphrase."""
        if self.encryption is None:
            raise FormatError("this volume is not encrypted; it has no passphrase to change")
        _check_passphrase(new)
        master = crypto.unwrap_master_key(
            self.encryption.wrapped_key,
            crypto.derive_kek(old, self.encryption.kdf),
            self.volume_id,
        )
        kdf = kdf or crypto.KdfParams(salt=os.urandom(16))
        wrapped = crypto.wrap_master_key(master, crypto.derive_kek(new, kdf), self.volume_id)
        return replace(self, encryption=Encryption(kdf=kdf, wrapped_key=wrapped))


def _check_passphrase(passphrase: str) -> None:
    # unlock() treats "" as "no passphrase given": never create what it cannot open.
    if not passphrase:
        raise CryptoError("the passphrase is empty; choose a non-empty passphrase")


def new_header(
    name: str,
    chunk_size: int,
    compression_level: int,
    passphrase: str | None = None,
    kdf: crypto.KdfParams | None = None,
) -> VolumeHeader:
    """A fresh volume: new id and, when a passphrase is given, a new random master key."""
    volume_id = uuid.uuid4().bytes
    enc = None
    if passphrase is not None:
        _check_passphrase(passphrase)
        kdf = kdf or crypto.KdfParams(salt=os.urandom(16))
        master = os.urandom(crypto.KEY_SIZE)
        enc = Encryption(
            kdf=kdf,
            wrapped_key=crypto.wrap_master_key(
                master, crypto.derive_kek(passphrase, kdf), volume_id
            ),
        )
    return VolumeHeader(
        volume_id=volume_id,
        name=name,
        created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        chunk_size=chunk_size,
        compression_level=compression_level,
        encryption=enc,
    )
