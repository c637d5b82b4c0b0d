"""Targets for tests: keys, credentials files, TargetConfig objects and [[targets]] tables."""

from __future__ import annotations

import os
import secrets
import tempfile
import uuid
from pathlib import Path

from vaultsync.commands.local_servers import LocalProvider
from vaultsync.config import TargetConfig


def new_keys() -> tuple[str, str]:
    return "VS" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)


_CRED_DIR = Path(tempfile.mkdtemp(prefix="vs-creds-"))


def credentials_file(access_key: str, secret_key: str) -> Path:
    path = _CRED_DIR / f"{uuid.uuid4().hex}.creds"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"access_key_id = {access_key}\nsecret_access_key = {secret_key}\n")
    return path


def target_for(
    p: LocalProvider,
    name: str = "t1",
    *,
    bucket: str | None = None,
    prefix: str = "vol/",
    mode: str = "async",
    secret: str | None = None,
) -> TargetConfig:
    """A target config on `p`, in a fresh bucket unless one is given."""
    if bucket is None:
        bucket = f"t-{uuid.uuid4().hex[:16]}"
        p.create_bucket(bucket)
    return TargetConfig.model_validate(
        {
            "name": name,
            "endpoint": p.endpoint,
            "bucket": bucket,
            "prefix": prefix,
            "mode": mode,
            "credentials": {"file": str(credentials_file(p.access_key, secret or p.secret_key))},
        }
    )


def target_block(
    name: str,
    p: LocalProvider,
    bucket: str,
    mode: str = "async",
    *,
    endpoint: str | None = None,
    prefix: str = "v",
    **options: str,
) -> str:
    """A [[targets]] table for a volume's TOML: `bucket` on `p` (reached at `endpoint`
    when given: a fault proxy in front of it), keys in a credentials file; `options`
    are further string keys (on_failure = "block")."""
    cred = credentials_file(p.access_key, p.secret_key)
    extra = "".join(f'{k} = "{v}"\n' for k, v in options.items())
    return (
        f'\n[[targets]]\nname = "{name}"\nendpoint = "{endpoint or p.endpoint}"\n'
        f'bucket = "{bucket}"\nprefix = "{prefix}"\nmode = "{mode}"\n{extra}'
        f'credentials = {{ file = "{cred}" }}\n'
    )


def sync_and_async_targets(sw: LocalProvider, rc: LocalProvider, bucket: str) -> str:
    """`sw` a sync target and `rc` an async one, both in `bucket`."""
    return target_block("sw", sw, bucket, "sync") + target_block("rc", rc, bucket, "async")
