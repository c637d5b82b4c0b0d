"""`vaultsync init` and `status` as a user runs them: a real process against real servers.

Each test checks the exit code and that a user mistake costs one line on
stderr, with no traceback and no secret in it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from minio import Minio

from vaultsync.commands.local_servers import LocalProvider


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "vaultsync", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def fresh_bucket(p: LocalProvider) -> str:
    name = f"cli-{uuid.uuid4().hex[:12]}"
    p.create_bucket(name)
    return name


def target_toml(name: str, p: Any, bucket: str, mode: str) -> str:
    return (
        f'\n[[targets]]\nname = "{name}"\nendpoint = "{p.endpoint}"\nbucket = "{bucket}"\n'
        f'prefix = "vol/one"\nmode = "{mode}"\n'
        f'credentials = {{ access_key_id_env = "AK_{name}", '
        f'secret_access_key_env = "SK_{name}" }}\n'
    )


def creds(name: str, p: Any, secret: str | None = None) -> dict[str, str]:
    return {f"AK_{name}": p.access_key, f"SK_{name}": secret or p.secret_key}


def write_config(tmp_path: Path, targets: str, extra_volume: str = "") -> Path:
    cfg = tmp_path / "vs.toml"
    cfg.write_text(f'[volume]\nname = "cli"\nstate_dir = "state"\n{extra_volume}{targets}')
    return cfg


def assert_one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode == 1, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    text = " ".join(lines)
    assert "Traceback" not in res.stderr
    assert text.startswith("error:"), res.stderr
    for n in needles:
        assert n in text, (n, res.stderr)


def minio_client(p: LocalProvider) -> Minio:
    return Minio(p.endpoint.removeprefix("http://"), p.access_key, p.secret_key, secure=False)


def test_init_writes_header_to_both_targets_and_is_idempotent(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    b1, b2 = fresh_bucket(seaweedfs), fresh_bucket(rclone)
    cfg = write_config(
        tmp_path,
        target_toml("sw", seaweedfs, b1, "sync") + target_toml("rc", rclone, b2, "async"),
    )
    env = {**creds("sw", seaweedfs), **creds("rc", rclone)}
    res = run(["init", str(cfg)], env)
    assert res.returncode == 0, res.stderr
    assert "header created" in res.stdout
    headers: list[dict[str, Any]] = []
    for p, b in ((seaweedfs, b1), (rclone, b2)):
        obj = minio_client(p).get_object(b, "vol/one/volume.json")
        headers.append(json.loads(obj.read()))
        obj.close()
    assert headers[0] == headers[1]
    assert headers[0]["format"] == "vaultsync-volume"
    assert headers[0]["name"] == "cli"
    local = json.loads((tmp_path / "state" / "volume.json").read_text())
    assert local["volume_id"] == headers[0]["volume_id"]

    again = run(["init", str(cfg)], env)
    assert again.returncode == 0, again.stderr
    assert "already exists" in again.stdout and "header present" in again.stdout

    st = run(["status", "--json", str(cfg)], env)
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["volume"]["volume_id"] == uuid.UUID(headers[0]["volume_id"]).hex
    assert doc["volume"]["last_lsn"] == 1
    assert [t["probe"] for t in doc["targets"]] == ["ok", "ok"]
    assert [t["health"] for t in doc["targets"]] == ["healthy", "healthy"]
    assert [t["mode"] for t in doc["targets"]] == ["sync", "async"]


def test_init_refuses_a_bucket_of_another_volume(tmp_path: Path, seaweedfs: LocalProvider) -> None:
    bucket = fresh_bucket(seaweedfs)
    env = creds("sw", seaweedfs)
    (tmp_path / "a").mkdir()
    first = write_config(tmp_path / "a", target_toml("sw", seaweedfs, bucket, "sync"))
    assert run(["init", str(first)], env).returncode == 0
    (tmp_path / "b").mkdir()
    second = write_config(tmp_path / "b", target_toml("sw", seaweedfs, bucket, "sync"))
    res = run(["init", str(second)], env)
    assert_one_line_error(res, "already holds volume", "'sw'")
    # The refusal left no local volume behind.
    assert not (tmp_path / "b" / "state" / "volume.json").exists()


def test_wrong_credentials_are_one_clear_line_without_the_secret(
    tmp_path: Path, rclone: LocalProvider
) -> None:
    bucket = fresh_bucket(rclone)
    cfg = write_config(tmp_path, target_toml("rc", rclone, bucket, "async"))
    bad = "definitely-not-the-secret-0123"
    res = run(["init", str(cfg)], creds("rc", rclone, secret=bad))
    assert_one_line_error(res, "'rc'", "credentials")
    assert bad not in res.stderr + res.stdout
    assert not (tmp_path / "state" / "volume.json").exists()


def test_missing_bucket_is_one_clear_line(tmp_path: Path, seaweedfs: LocalProvider) -> None:
    cfg = write_config(tmp_path, target_toml("sw", seaweedfs, "no-such-bucket-here", "sync"))
    res = run(["init", str(cfg)], creds("sw", seaweedfs))
    assert_one_line_error(res, "'sw'", "bucket")


def test_unreachable_endpoint_is_one_clear_line(tmp_path: Path, rclone: LocalProvider) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = SimpleNamespace(
        endpoint=f"http://127.0.0.1:{port}",
        access_key=rclone.access_key,
        secret_key=rclone.secret_key,
    )
    cfg = write_config(tmp_path, target_toml("gone", dead, "whatever", "async"))
    res = run(["init", str(cfg)], creds("gone", dead), timeout=90)
    assert_one_line_error(res, "'gone'")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[volume]\nstate_dir = "s"\n', "volume.name"),
        ('[volume]\nname = "x"\nstate_dir = "s"\nchunk_sise = 4096\n', "volume.chunk_sise"),
        (
            '[volume]\nname = "x"\nstate_dir = "s"\n[[targets]]\nname = "t"\n'
            'endpoint = "http://127.0.0.1:1"\nbucket = "bkt"\nmode = "fast"\n'
            'credentials = { file = "c" }\n',
            "targets[0].mode",
        ),
        ("[volume\nname=", "invalid TOML"),
    ],
)
def test_broken_config_is_one_line(tmp_path: Path, body: str, needle: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    res = run(["init", str(cfg)])
    assert_one_line_error(res, needle)


def test_missing_config_file(tmp_path: Path) -> None:
    res = run(["status", str(tmp_path / "nope.toml")])
    assert_one_line_error(res, "does not exist")


def test_messages_print_names_and_paths_as_they_are(tmp_path: Path) -> None:
    """Brackets in a path are not console markup: `[old]` must reach the user whole."""
    missing = tmp_path / "[old]" / "[api] vs.toml"
    res = run(["status", str(missing)])
    assert_one_line_error(res, str(missing), "does not exist")


def test_encrypted_volume_needs_the_right_passphrase(
    tmp_path: Path, seaweedfs: LocalProvider
) -> None:
    bucket = fresh_bucket(seaweedfs)
    cfg = write_config(
        tmp_path, target_toml("sw", seaweedfs, bucket, "sync"), extra_volume="encryption = true\n"
    )
    env = creds("sw", seaweedfs)
    res = run(["init", str(cfg)], env)
    assert_one_line_error(res, "VAULTSYNC_PASSPHRASE")
    ok = run(["init", str(cfg)], {**env, "VAULTSYNC_PASSPHRASE": "correct horse"})
    assert ok.returncode == 0, ok.stderr
    header = json.loads((tmp_path / "state" / "volume.json").read_text())
    assert header["encryption"]["cipher"] == "aes-256-gcm"
    wrong = run(["init", str(cfg)], {**env, "VAULTSYNC_PASSPHRASE": "battery staple"})
    assert_one_line_error(wrong, "wrong passphrase")
    assert "battery staple" not in wrong.stderr


def test_demo_once_starts_providers_and_creates_the_volume(tmp_path: Path) -> None:
    res = run(["demo", "--dir", str(tmp_path / "demo"), "--once"], timeout=180)
    assert res.returncode == 0, res.stderr
    assert "seaweedfs: header created" in " ".join(res.stdout.split())
    assert "rclone: header created" in " ".join(res.stdout.split())
    assert "volume mounted at" in res.stdout and "unmounting" in res.stdout
    assert (tmp_path / "demo" / "mnt").is_dir()
    assert "vaultsync" not in Path("/proc/mounts").read_text().split(str(tmp_path))[-1][:200]
    # The providers it started are gone: their PIDs were stopped, not left behind.
    pids = {int(m) for m in re.findall(r"\(pid (\d+)\)", res.stdout)}
    assert len(pids) == 2
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")


def test_relative_paths_in_config_are_relative_to_the_file(
    tmp_path: Path, seaweedfs: LocalProvider
) -> None:
    bucket = fresh_bucket(seaweedfs)
    conf_dir = tmp_path / "etc"
    (conf_dir / "keys").mkdir(parents=True)
    cred = conf_dir / "keys" / "sw.cred"
    cred.write_text(
        f"access_key_id = {seaweedfs.access_key}\nsecret_access_key = {seaweedfs.secret_key}\n"
    )
    cred.chmod(0o600)
    cfg = conf_dir / "vs.toml"
    cfg.write_text(
        '[volume]\nname = "rel"\nstate_dir = "state"\n'
        f'[[targets]]\nname = "sw"\nendpoint = "{seaweedfs.endpoint}"\nbucket = "{bucket}"\n'
        'credentials = { file = "keys/sw.cred" }\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run(
        [sys.executable, "-m", "vaultsync", "init", str(cfg)],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert (conf_dir / "state" / "volume.json").exists()
    assert not (elsewhere / "state").exists()
